"""The naive lower bound of a merge: θ0 + Σ_i θ_i, tensor by tensor, then save.

What any merge of N checkpoints must at least do: import torch, read every tensor of N + 1 files
once, one float32 add per expert entry, write one model. No validation, no progress bar, no
per-read file handles, no float32 copy of the pretrained tensor before the sum: the floor the
methods are compared against (``benchmarks/run_all.py`` reports each method as a ratio to it).

Run: ``python benchmarks/naive_sum.py <pool dir> <N> <out.safetensors>``
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def main(pool: Path, n: int, out: Path) -> None:
    pre = safe_open(str(pool / "pretrained" / "model.safetensors"), framework="pt")
    experts = [
        safe_open(str(pool / f"expert_{i:02d}" / "model.safetensors"), framework="pt")
        for i in range(n)
    ]
    pre_keys = set(pre.keys())
    merged = {}
    for key in experts[0].keys():  # the image tower's keys (flat, transformers-5 layout)
        stored = key if key in pre_keys else f"vision_model.{key}"
        # get_tensor returns a view of the (copy-on-write) mapping: the first add allocates.
        acc = pre.get_tensor(stored).to(torch.float32) + experts[0].get_tensor(key)
        for expert in experts[1:]:
            acc += expert.get_tensor(key)
        merged[key] = acc
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(merged, str(out), {"format": "pt"})


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
