"""One whole merge in one process: pool → method → merged state dict → safetensors on disk.

The method is built from its own ``conf/method/<name>.yaml`` (``_target_`` + defaults) with
``key=value`` overrides (values parsed as YAML), and runs on a ``CLIPVisionModelPool`` over the
first N experts of a synthetic pool (``benchmarks/pools.py``), exactly as the runner would call it
(lazily read experts, default ``check_finite``). The merged state dict is written with
``fusion_bench.checkpoint.save_safetensors`` (``--save pool`` writes it the runner's way instead,
``CLIPVisionModel.save_pretrained`` through ``modelpool.save``).

The last stdout line is JSON with in-process phase times (imports, merge, save); the caller
measures wall time and peak RSS of the whole process.

Run: ``python benchmarks/merge_once.py task_arithmetic <pool dir> 8 /tmp/out scaling_factor=0.3``
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402


def build_method(name: str, overrides: list[str]):
    """The method from its YAML with ``key=value`` overrides, as ``fusion_bench.merge`` builds it."""
    from fusion_bench.api import build_method as from_yaml

    values = {}
    for item in overrides:
        key, _, value = item.partition("=")
        values[key] = yaml.safe_load(value)
    return from_yaml(name, values)[0]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("method", help="a name under conf/method/")
    parser.add_argument("pool", type=Path)
    parser.add_argument("n", type=int, help="merge the first N experts")
    parser.add_argument("out", type=Path, help="output directory")
    parser.add_argument("overrides", nargs="*", help="method hyper-parameters, key=value")
    parser.add_argument("--save", choices=("safetensors", "pool"), default="safetensors")
    args = parser.parse_args(argv)

    from fusion_bench.checkpoint import save_safetensors
    from fusion_bench.method.base import Context, merged_state_dict
    from fusion_bench.modelpool.clip_vision import CLIPVisionModelPool

    method = build_method(args.method, args.overrides)
    pool = CLIPVisionModelPool(
        pretrained=str(args.pool / "pretrained"),
        finetuned={f"task{i:02d}": str(args.pool / f"expert_{i:02d}") for i in range(args.n)},
    )
    t_imports = time.perf_counter()

    result = merged_state_dict(method, pool, None, Context(), args.method)
    t_merge = time.perf_counter()

    if args.save == "pool":
        args.out.mkdir(parents=True, exist_ok=True)
        pool.save(result, args.out, card=f"benchmark merge: {args.method}\n")
    else:
        save_safetensors(result, args.out / "model.safetensors", {"format": "pt"})
    t_save = time.perf_counter()

    return print_phases(T_START, t_imports, t_merge, t_save)


def print_phases(start: float, imports: float, merge: float, save: float) -> dict:
    """The in-process phase times, printed as the last stdout line (JSON) for the harness."""
    phases = {"imports_s": imports - start, "merge_s": merge - imports, "save_s": save - merge}
    print(json.dumps(phases))
    return phases


if __name__ == "__main__":
    main()
