"""Session fixtures: tiny CLIP models and datasets built offline in temp dirs.

Everything loads through the same code paths as the real checkpoints and hub datasets:
- a tiny open_clip ViT CLIP (architecture registered from a JSON file, like any custom model);
- a tiny Hugging Face CLIPModel saved with ``save_pretrained`` (+ a character-level tokenizer);
- tiny image datasets written as parquet files and read back with ``datasets.load_dataset``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Set before anything imports huggingface_hub/datasets: an accidental download fails loudly.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tiny tensors gain nothing from intra-op threads, and on a loaded machine each parallel op waits
# for a scheduler slice (measured: 20 ms vs 0.02 ms for a 512 KiB zeros): one thread is faster.
torch.set_num_threads(1)

TASKS = ("mnist", "eurosat")  # real task specs (10 classes each), tiny local data


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    os.environ["FUSION_BENCH_CACHE"] = str(tmp_path_factory.mktemp("fb_cache"))


def perturbed(state: dict, seed: int, scale: float = 0.02) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
        for k, v in state.items()
    }


# --- open_clip ---------------------------------------------------------------------------------
TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def open_clip_pool_files(tmp_path_factory) -> dict:
    """{'config', 'pretrained', 'experts': {task: path}, 'model_name'} of a tiny open_clip CLIP."""
    import open_clip
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("open_clip_pool")
    config = root / "fb-tiny-vit.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("fb-tiny-vit", pretrained=None)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, root / "pretrained.safetensors"
    )
    visual = model.visual.state_dict()
    experts = {}
    for i, task in enumerate(TASKS):
        path = root / f"{task}.safetensors"
        save_file({k: v.contiguous() for k, v in perturbed(visual, seed=i + 1).items()}, path)
        experts[task] = str(path)
    return {
        "config": str(config),
        "pretrained": str(root / "pretrained.safetensors"),
        "experts": experts,
        "model_name": "fb-tiny-vit",
        "root": root,
    }


@pytest.fixture(scope="session")
def open_clip_pool(open_clip_pool_files):
    from fusion_bench.modelpool.open_clip import OpenCLIPModelPool

    f = open_clip_pool_files
    return OpenCLIPModelPool(
        f["model_name"], f["pretrained"], f["experts"], model_config=f["config"]
    )


# --- independently trained towers (fusion) -------------------------------------------------------
@pytest.fixture(scope="session")
def independent_pool_files(open_clip_pool_files, tmp_path_factory) -> dict:
    """Three towers of the tiny open_clip architecture from different random initialisations
    (no common start: a stand-in for models trained from scratch) and one narrower tower (width
    16, its own config): {'models': {name: path}, 'narrow': path, 'narrow_config': path}."""
    import open_clip
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("independent_pool")
    models = {}
    for seed in range(3):
        torch.manual_seed(100 + seed)
        visual = open_clip.create_model(open_clip_pool_files["model_name"], pretrained=None).visual
        path = root / f"seed{seed}.safetensors"
        save_file({k: v.contiguous() for k, v in visual.state_dict().items()}, path)
        models[f"seed{seed}"] = str(path)
    narrow = json.loads(json.dumps(TINY_OPEN_CLIP))
    narrow["vision_cfg"]["width"] = 16
    config = root / "fb-tiny-vit-w16.json"
    config.write_text(json.dumps(narrow))
    open_clip.add_model_config(config)
    torch.manual_seed(200)
    visual = open_clip.create_model("fb-tiny-vit-w16", pretrained=None).visual
    save_file(
        {k: v.contiguous() for k, v in visual.state_dict().items()}, root / "narrow.safetensors"
    )
    return {
        "models": models,
        "narrow": str(root / "narrow.safetensors"),
        "narrow_config": str(config),
    }


@pytest.fixture(scope="session")
def independent_pool(open_clip_pool_files, independent_pool_files):
    from fusion_bench.modelpool.independent import IndependentModelPool
    from fusion_bench.modelpool.open_clip import OpenCLIPModelPool

    f = open_clip_pool_files
    base = OpenCLIPModelPool(f["model_name"], f["pretrained"], {}, model_config=f["config"])
    return IndependentModelPool(base, independent_pool_files["models"], list(TASKS))


@pytest.fixture
def independent_cli_args(open_clip_pool_files, independent_pool_files, tiny_datasets) -> list[str]:
    f = open_clip_pool_files
    return [
        "modelpool=tiny8_scratch",  # the shipped independent pool, its files switched to the tiny ones
        f"modelpool.base.model_name={f['model_name']}",
        f"modelpool.base.model_config='{f['config']}'",
        f"modelpool.base.pretrained='{f['pretrained']}'",
        f"modelpool.models={dict_override(independent_pool_files['models'])}",
        f"suite.tasks=[{','.join(TASKS)}]",
        f"taskpool.datasets={dict_override(tiny_datasets)}",
    ]


# --- Hugging Face ------------------------------------------------------------------------------
def _char_tokenizer_files(directory: Path) -> int:
    """A character-level CLIP BPE vocabulary (no merges): enough for CLIPTokenizer offline."""
    chars = [chr(c) for c in range(33, 127)]
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return len(vocab)


def tiny_hf_config(vocab_size: int, patch_size: int = 8):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": vocab_size,
            "max_position_embeddings": 32,
            "bos_token_id": vocab_size - 2,
            "eos_token_id": vocab_size - 1,
            "pad_token_id": vocab_size - 1,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 16,
            "patch_size": patch_size,
        },
        projection_dim=16,
    )


@pytest.fixture(scope="session")
def hf_pool_files(tmp_path_factory) -> dict:
    """A tiny CLIPModel directory + CLIPVisionModel expert directories (transformers-5 layout)."""
    from transformers import CLIPModel, CLIPTokenizer, CLIPVisionModel

    root = tmp_path_factory.mktemp("hf_pool")
    pre_dir = root / "pretrained"
    pre_dir.mkdir()
    vocab_size = _char_tokenizer_files(pre_dir)
    CLIPTokenizer(str(pre_dir / "vocab.json"), str(pre_dir / "merges.txt")).save_pretrained(pre_dir)
    torch.manual_seed(0)
    config = tiny_hf_config(vocab_size)
    model = CLIPModel(config)
    model.save_pretrained(pre_dir)
    vision_state = {
        k.removeprefix("vision_model."): v
        for k, v in model.state_dict().items()
        if k.startswith("vision_model.")
    }
    experts = {}
    for i, task in enumerate(TASKS):
        expert = CLIPVisionModel(config.vision_config)
        expert.load_state_dict(perturbed(vision_state, seed=i + 1))
        expert.save_pretrained(root / task)
        experts[task] = str(root / task)
    return {"pretrained": str(pre_dir), "experts": experts, "root": root, "vocab_size": vocab_size}


@pytest.fixture(scope="session")
def hf_pool(hf_pool_files):
    from fusion_bench.modelpool.clip_vision import CLIPVisionModelPool

    return CLIPVisionModelPool(hf_pool_files["pretrained"], hf_pool_files["experts"])


# --- datasets ----------------------------------------------------------------------------------
def write_image_dataset(directory: Path, n_classes: int, sizes: dict[str, int], seed: int) -> Path:
    """Parquet files train/validation/test with an Image and a ClassLabel column."""
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=n_classes)}
    )
    for split, n in sizes.items():
        labels = [i % n_classes for i in range(n)]
        images = [
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)) for _ in labels
        ]
        ds = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
        ds.to_parquet(str(directory / f"{split}.parquet"))
    return directory


@pytest.fixture(scope="session")
def tiny_datasets(tmp_path_factory) -> dict[str, str]:
    """task -> local dataset dir with train (40), validation (10) and test (24) images."""
    root = tmp_path_factory.mktemp("datasets")
    return {
        task: str(write_image_dataset(root / task, 10, {"train": 40, "test": 24}, seed=i))
        for i, task in enumerate(TASKS)
    }


# --- LoRA experts: PEFT adapters on the tiny open_clip tower -------------------------------------
LORA_TARGETS = ["c_fc", "c_proj"]  # nn.Linear modules (PEFT's MultiheadAttention layer is refused)


def base_pool(files: dict):
    """The tiny open_clip CLIP as a LoRA pool's base (no experts of its own)."""
    from fusion_bench.modelpool.open_clip import OpenCLIPModelPool

    return OpenCLIPModelPool(
        model_name=files["model_name"],
        pretrained=files["pretrained"],
        finetuned={},
        model_config=files["config"],
    )


def write_adapter(base, directory, seed: int, **options) -> dict:
    """A PEFT LoRA adapter with random (non-zero) factors on the tiny tower; returns PEFT's own
    merged tower (``merge_and_unload``) as the ground truth."""
    torch.manual_seed(seed)
    import peft

    config = peft.LoraConfig(
        r=options.pop("r", 4),
        lora_alpha=options.pop("lora_alpha", 8),
        target_modules=options.pop("target_modules", LORA_TARGETS),
        init_lora_weights=False,  # random A and B: a non-zero update
        **options,
    )
    model = peft.get_peft_model(base.build_encoder(), config)
    model.save_pretrained(str(directory))
    merged = model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.fixture(scope="session")
def lora_pool_files(open_clip_pool_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = base_pool(open_clip_pool_files)
    adapters, truth = {}, {}
    for i, task in enumerate(TASKS):
        adapters[task] = str(root / task)
        truth[task] = write_adapter(base, root / task, seed=10 + i)
    return {"adapters": adapters, "truth": truth, "root": root}


@pytest.fixture(scope="session")
def lora_pool(open_clip_pool_files, lora_pool_files):
    from fusion_bench.modelpool.lora import LoRAModelPool

    return LoRAModelPool(base=base_pool(open_clip_pool_files), adapters=lora_pool_files["adapters"])


# --- CLI arguments pointing the real configs at the tiny pools ------------------------------------
def dict_override(mapping: dict[str, str]) -> str:
    """A Hydra command-line dict: {a:'x',b:'y'} (quoted: paths contain characters Hydra parses)."""
    return "{" + ",".join(f"{k}:'{v}'" for k, v in mapping.items()) + "}"


@pytest.fixture
def hf_cli_args(hf_pool_files, tiny_datasets) -> list[str]:
    return [
        "modelpool=clip_vision",
        f"modelpool.pretrained='{hf_pool_files['pretrained']}'",
        f"modelpool.finetuned={dict_override(hf_pool_files['experts'])}",
        f"suite.tasks=[{','.join(TASKS)}]",
        f"taskpool.datasets={dict_override(tiny_datasets)}",
    ]


@pytest.fixture
def open_clip_cli_args(open_clip_pool_files, tiny_datasets) -> list[str]:
    f = open_clip_pool_files
    return [
        "modelpool=open_clip",
        f"modelpool.model_name={f['model_name']}",
        f"modelpool.model_config='{f['config']}'",
        f"modelpool.pretrained='{f['pretrained']}'",
        f"modelpool.finetuned={dict_override(f['experts'])}",
        f"suite.tasks=[{','.join(TASKS)}]",
        f"taskpool.datasets={dict_override(tiny_datasets)}",
    ]


@pytest.fixture
def lora_cli_args(open_clip_pool_files, lora_pool_files, tiny_datasets) -> list[str]:
    f = open_clip_pool_files
    return [
        "modelpool=lora",  # the generic LoRA pool, its base switched to an open_clip CLIP
        "modelpool.base._target_=fusion_bench.modelpool.open_clip.OpenCLIPModelPool",
        f"+modelpool.base.model_name={f['model_name']}",
        f"+modelpool.base.model_config='{f['config']}'",
        f"modelpool.base.pretrained='{f['pretrained']}'",
        f"modelpool.adapters={dict_override(lora_pool_files['adapters'])}",
        f"suite.tasks=[{','.join(TASKS)}]",
        f"taskpool.datasets={dict_override(tiny_datasets)}",
    ]
