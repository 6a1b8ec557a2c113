"""LoRA merges in their low-rank spaces vs the same rule on the expanded full matrices: time and
peak memory, as ratios measured in one run (issue 14).

Two sizes:
- ``tiny8``: the shipped tiny8 LoRA experts (8 × rank 16 on the 12 MLP matrices, 768×192 and
  192×768), read through the LoRA pool;
- ``b32``: ViT-B/32 size, synthetic: 8 experts × rank-16 adapters on all attention projections
  (q, k, v, out: 4 × 12 matrices of 768×768), random factors (N(0, 1/768) A, N(0, 0.02²) B),
  the pretrained matrices random too (only the adapted weights: the other keys are copied alike
  by both).

Each (size, rule, space) is one fresh process (this script with ``--one``), timing the merge
alone and reporting its peak RSS (``ru_maxrss``) and the RSS the merge added over the set-up
(the pretrained weights and the factors, which both spaces hold), with glibc's mmap threshold
fixed so that RSS measures what is held. ``full`` runs the rule of
``conf/method/`` on the experts as the LoRA pool presents them (W0 + s·B A computed per key on
lookup, so it streams as any merge does); ``core`` is Core Space with that rule inside;
``knots`` is KnOTS with it.

Run: ``.venv/bin/python benchmarks/lora_merge.py [--sizes tiny8 b32] [--runs 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RULES = {  # label: (conf/method name, options) — the same options in every space
    "TA": ("task_arithmetic", {"scaling_factor": 0.3}),
    "TIES": ("ties_merging", {"scaling_factor": 0.6, "threshold": 30, "merge_func": "mean"}),
    "TSV-M": ("tsv_m", {"scaling_factor": 1.0}),
    "Iso-C": ("iso_c", {"scaling_factor": 1.0}),
}
SPACES = ("full", "core", "knots")
# A fixed mmap threshold: freed blocks above 128 KiB go back to the OS, so the RSS a merge adds
# is what it holds, not glibc's heap growth (without it Core Space's float64 temporaries showed
# +217 MiB at b32 instead of the +132 MiB it holds, measured), as in tests/test_memory.py.
ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "HF_HUB_OFFLINE": "1"}


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_b32(n_experts: int = 8, rank: int = 16, seed: int = 0):
    import torch

    from fusion_bench.lora import LowRank

    g = torch.Generator().manual_seed(seed)
    keys = [
        f"encoder.layers.{layer}.self_attn.{proj}.weight"
        for layer in range(12)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj")
    ]
    pretrained = {k: torch.randn(768, 768, generator=g) / 768**0.5 for k in keys}
    adapters = {
        f"task{t}": {
            k: LowRank(
                B=0.02 * torch.randn(768, rank, generator=g),
                A=torch.randn(rank, 768, generator=g) / 768**0.5,
            )
            for k in keys
        }
        for t in range(n_experts)
    }
    return pretrained, adapters


def tiny8():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from fusion_bench.paths import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        cfg = compose("config", overrides=["modelpool=tiny8_lora"])
    pool = instantiate(cfg.modelpool, _convert_="all")
    pretrained = pool.pretrained()
    adapters = {name: pool.adapter(name) for name in pool.expert_names}
    keys = sorted({k for a in adapters.values() for k in a})
    pretrained = {k: pretrained[k] for k in keys}  # the adapted weights, in memory like b32's
    adapters = {n: {k: a[k] for k in a} for n, a in adapters.items()}  # factors read once
    return pretrained, adapters


def one(size: str, rule: str, space: str) -> dict:
    import torch

    from fusion_bench.api import build_method
    from fusion_bench.method.lora.core_space import CoreSpace
    from fusion_bench.method.lora.knots import KnOTS
    from fusion_bench.modelpool.lora import ExpandedLoRA

    torch.set_num_threads(2)
    pretrained, adapters = synthetic_b32() if size == "b32" else tiny8()
    name, options = RULES[rule]
    setup = rss_mib()
    t = time.perf_counter()
    if space == "full":
        method, _ = build_method(name, options)
        experts = {n: ExpandedLoRA(pretrained, a) for n, a in adapters.items()}
        merged = method.merge(pretrained, experts)
    elif space == "core":
        merged = CoreSpace(base=name, base_options=options).merge(pretrained, adapters)
    else:
        merged = KnOTS(base=name, base_options=options).merge(pretrained, adapters)
    seconds = time.perf_counter() - t
    assert all(torch.isfinite(v).all() for v in merged.values())
    return {"seconds": seconds, "peak_rss_mib": rss_mib(), "merge_added_mib": rss_mib() - setup}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny8", "b32"])
    parser.add_argument("--rules", nargs="+", default=list(RULES))
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--one", nargs=3, metavar=("SIZE", "RULE", "SPACE"))
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    rows = []
    for size in args.sizes:
        for rule in args.rules:
            cells = {}
            for space in SPACES:
                if space == "knots" and rule in ("TSV-M", "Iso-C"):
                    continue  # KnOTS pairs with element-wise rules (TA, TIES) in its paper
                runs = []
                for _ in range(args.runs):
                    done = subprocess.run(
                        [sys.executable, __file__, "--one", size, rule, space],
                        capture_output=True,
                        text=True,
                        cwd=ROOT,
                        env=ENV,
                    )
                    if done.returncode:
                        sys.exit(f"{size} {rule} {space} failed:\n{done.stderr[-3000:]}")
                    runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
                cells[space] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            rows.append({"size": size, "rule": rule, **cells})
            full = cells["full"]
            line = f"{size:6} {rule:6} full {full['seconds']:7.2f} s {full['merge_added_mib']:7.0f} MiB"
            for space in ("core", "knots"):
                if space in cells:
                    c = cells[space]
                    line += (
                        f" | {space} {c['seconds']:7.2f} s ({full['seconds'] / c['seconds']:6.1f}× "
                        f"faster) {c['merge_added_mib']:6.0f} MiB"
                    )
            print(line, flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
