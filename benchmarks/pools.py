"""Synthetic model pools of the real CLIP architectures, built once on disk and cached.

A pool directory holds ``pretrained/`` (a random full ``CLIPModel`` written by ``save_pretrained``,
with a character-level tokenizer so the zero-shot head can be built offline) and ``expert_00/`` ...
(``CLIPVisionModel`` directories, ``save_pretrained``, safetensors). Expert i is

    θ_i = θ0 + U_i V_i + ε_i     (per tensor: rank-``RANK`` update + small dense noise)

which has the size, layout and key set of a real fine-tuned tower: what merge speed and memory
depend on. Values are seeded (expert i from ``seed + 1 + i``), so rebuilding gives the same bytes.
The N = 8 pool is the first 8 experts of the N = 20 pool (one directory serves both).

Location: ``$FUSION_BENCH_CACHE/bench/<arch>/`` (default ``~/.cache/fusion_bench/bench/``), never
inside the repository. A pool is complete when its ``manifest.json`` lists the expert; an
interrupted build resumes where it stopped.

Run: ``python benchmarks/pools.py b32 --experts 20`` (``l14`` needs ~26 GB of disk for 20 experts).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

RANK = 8  # rank of the synthetic task update of each matrix
UPDATE_STD = 2e-3  # entry std of the low-rank update (real CLIP task vectors: ~1e-3 .. 1e-2)
NOISE_STD = 2e-4  # entry std of the dense noise on every floating tensor

# Hugging Face CLIP configs. b32 and l14 match openai/clip-vit-base-patch32 and -large-patch14
# (text tower included, vocab 49408, so the pretrained file has the real size).
ARCHS: dict[str, dict] = {
    # a small CLIP with B/32's key names: fast reference-parity checks (benchmarks/parity.py)
    "s": {
        "vision": {
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        "text": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "vocab_size": 256,
        },
        "projection_dim": 32,
    },
    "b32": {
        "vision": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": 224,
            "patch_size": 32,
        },
        "text": {
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_hidden_layers": 12,
            "num_attention_heads": 8,
            "vocab_size": 49408,
        },
        "projection_dim": 512,
    },
    "l14": {
        "vision": {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "image_size": 224,
            "patch_size": 14,
        },
        "text": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "vocab_size": 49408,
        },
        "projection_dim": 768,
    },
}


def bench_root() -> Path:
    """``$FUSION_BENCH_CACHE/bench`` (the package's cache root), created on demand."""
    from fusion_bench.paths import cache_dir

    return cache_dir() / "bench"


def expert_dir(pool: Path, i: int) -> Path:
    return pool / f"expert_{i:02d}"


def pool_files(pool: Path, n: int) -> list[Path]:
    """The weight files a merge of the first ``n`` experts reads (for page-cache warm-up)."""
    return [pool / "pretrained" / "model.safetensors"] + [
        expert_dir(pool, i) / "model.safetensors" for i in range(n)
    ]


def _char_tokenizer(directory: Path) -> int:
    """A character-level CLIP BPE vocabulary (no merges): CLIPTokenizer works offline with it."""
    chars = [chr(c) for c in range(33, 127)]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    from transformers import CLIPTokenizer

    CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt")).save_pretrained(
        directory
    )
    return len(vocab)


def _clip_config(arch: str, n_tokens: int):
    from transformers import CLIPConfig

    spec = ARCHS[arch]
    text = dict(
        spec["text"],
        max_position_embeddings=77,
        bos_token_id=n_tokens - 2,
        eos_token_id=n_tokens - 1,
        pad_token_id=n_tokens - 1,
    )
    return CLIPConfig(
        text_config=text, vision_config=spec["vision"], projection_dim=spec["projection_dim"]
    )


def synthetic_expert(pretrained: dict, seed: int):
    """θ0 + low-rank update + dense noise, tensor by tensor (float tensors only)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, w in pretrained.items():
        if not w.is_floating_point():
            out[key] = w.clone()
            continue
        delta = NOISE_STD * torch.randn(w.shape, generator=g)
        if w.ndim >= 2:  # matrices, conv kernels, position embeddings: (out, rest) low rank
            rows, cols = w.shape[0], w.numel() // w.shape[0]
            r = min(RANK, rows, cols)
            u = torch.randn(rows, r, generator=g)
            v = torch.randn(r, cols, generator=g)
            delta += (UPDATE_STD / r**0.5) * (u @ v).reshape(w.shape)
        else:  # biases, layer norms, class embedding
            delta += UPDATE_STD * torch.randn(w.shape, generator=g)
        out[key] = w + delta
    return out


def build_pool(
    arch: str, n_experts: int, root: Path | None = None, seed: int = 0, log=print
) -> Path:
    """Build (or complete) the pool of ``arch`` with at least ``n_experts`` experts; its path."""
    import torch
    from transformers import CLIPModel, CLIPVisionModel

    pool = (root or bench_root()) / arch
    manifest_path = pool / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    wanted = {
        "arch": ARCHS[arch],
        "seed": seed,
        "rank": RANK,
        "update_std": UPDATE_STD,
        "noise_std": NOISE_STD,
    }
    if manifest.get("spec") != wanted:  # first build, or the recipe changed: start over
        shutil.rmtree(pool, ignore_errors=True)
        manifest = {"spec": wanted, "experts": 0}
    if manifest["experts"] >= n_experts:
        return pool
    pool.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)

    pre_dir = pool / "pretrained"
    if manifest["experts"] == 0:
        log(f"building {arch} pretrained CLIPModel in {pre_dir}")
        shutil.rmtree(pre_dir, ignore_errors=True)
        pre_dir.mkdir(parents=True)
        n_tokens = _char_tokenizer(pre_dir)
        torch.manual_seed(seed)
        CLIPModel(_clip_config(arch, n_tokens)).save_pretrained(pre_dir)
    clip = CLIPModel.from_pretrained(pre_dir)
    vision = CLIPVisionModel(clip.config.vision_config)
    theta0 = {
        k.removeprefix("vision_model."): v
        for k, v in clip.state_dict().items()
        if k.startswith("vision_model.")
    }
    del clip
    vision.load_state_dict(theta0)
    for i in range(manifest["experts"], n_experts):
        log(f"building {arch} expert {i + 1}/{n_experts}")
        vision.load_state_dict(synthetic_expert(theta0, seed + 1 + i))
        vision.save_pretrained(expert_dir(pool, i))
        manifest["experts"] = i + 1
        tmp = manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, manifest_path)
    return pool


def build_flat_pool(
    pool: Path, n_experts: int, shapes: dict[str, tuple[int, ...]], seed: int = 0
) -> Path:
    """A pool in the same layout without transformers (for the regression test): random θ0 with
    the given tensor shapes, experts as above, ``config.json`` stubs (merging only checks that
    they exist; evaluating or ``modelpool.save`` would need real configs)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    theta0 = {k: 0.02 * torch.randn(shape, generator=g) for k, shape in shapes.items()}
    pre = pool / "pretrained"
    pre.mkdir(parents=True, exist_ok=True)
    save_file(
        {f"vision_model.{k}": v for k, v in theta0.items()},
        pre / "model.safetensors",
        {"format": "pt"},
    )
    (pre / "config.json").write_text("{}")
    for i in range(n_experts):
        d = expert_dir(pool, i)
        d.mkdir(parents=True, exist_ok=True)
        save_file(synthetic_expert(theta0, seed + 1 + i), d / "model.safetensors", {"format": "pt"})
        (d / "config.json").write_text("{}")
    return pool


def pool_bytes(pool: Path, n: int) -> int:
    return sum(f.stat().st_size for f in pool_files(pool, n))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("arch", choices=sorted(ARCHS))
    parser.add_argument("--experts", type=int, default=20)
    parser.add_argument(
        "--root", type=Path, default=None, help="default: $FUSION_BENCH_CACHE/bench"
    )
    args = parser.parse_args(argv)
    pool = build_pool(args.arch, args.experts, args.root, log=lambda m: print(m, file=sys.stderr))
    print(pool)


if __name__ == "__main__":
    main()
