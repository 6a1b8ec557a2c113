"""One whole merge by FusionBench (the reference implementation), for side-by-side rows in
``make bench`` (``benchmarks/run_all.py --reference-python <python of a venv with fusion-bench>``).

FusionBench installs a package also named ``fusion_bench``, so it lives in its own virtual
environment, and this script imports nothing from this repository. It mirrors
``benchmarks/merge_once.py``: FusionBench's ``CLIPVisionModelPool`` over the same synthetic pool
(the pretrained ``CLIPModel`` directory + the first N expert ``CLIPVisionModel`` directories), the
method's ``run(modelpool)`` on CPU, the merged image tower's state dict written with safetensors.
The last stdout line is JSON with in-process phase times.

Run: ``/tmp/fbref/bin/python benchmarks/fusionbench_reference.py tsv_m <pool dir> 8 /tmp/out``
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

# The harness puts this repository on PYTHONPATH for its own jobs: drop it, or ``fusion_bench``
# would be this project instead of FusionBench.
REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]


def build(method: str, kwargs: dict | None = None):
    """FusionBench's class for ``method`` with the same settings as our row (scaling 1.0).

    ``method`` may also be ``module:Class`` (e.g. ``fusion_bench.method:IsotropicMergingInCommon
    AndTaskSubspace``), built with ``kwargs``: what ``benchmarks/parity.py`` uses.
    """
    if ":" in method:
        import importlib

        module, _, name = method.partition(":")
        return getattr(importlib.import_module(module), name)(**(kwargs or {}))
    if method == "tsv_m":
        from fusion_bench.method import TaskSingularVectorMerging

        return TaskSingularVectorMerging(alpha=1.0, exclude_keys=[])
    if method == "iso_c":
        from fusion_bench.method import IsotropicMergingInCommonSubspace

        return IsotropicMergingInCommonSubspace(scaling_factor=1.0, exclude_keys=[])
    if method == "task_arithmetic":
        from fusion_bench.method import TaskArithmeticAlgorithm

        return TaskArithmeticAlgorithm(scaling_factor=0.3)
    raise SystemExit(f"no FusionBench reference configured for {method}")


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("method", help="tsv_m | iso_c | task_arithmetic | module:Class")
    parser.add_argument("pool", type=Path)
    parser.add_argument("n", type=int)
    parser.add_argument("out", type=Path)
    parser.add_argument("--kwargs", default="{}", help="JSON constructor arguments (module:Class)")
    parser.add_argument("--seed", type=int, default=None, help="torch.manual_seed before run")
    parser.add_argument(
        "--enable-grad",
        action="store_true",
        help="run without torch.no_grad() (methods that optimise with autograd, e.g. WUDI)",
    )
    args = parser.parse_args()

    import torch
    from lightning.fabric import Fabric
    from safetensors.torch import save_file

    from fusion_bench.modelpool import CLIPVisionModelPool

    models = {"_pretrained_": str(args.pool / "pretrained")}
    models |= {f"task{i:02d}": str(args.pool / f"expert_{i:02d}") for i in range(args.n)}
    pool = CLIPVisionModelPool(models)
    algorithm = build(args.method, json.loads(args.kwargs))
    if args.seed is not None:
        torch.manual_seed(args.seed)
    if hasattr(algorithm, "fabric"):
        algorithm.fabric = Fabric(accelerator="cpu", devices=1)
    t_imports = time.perf_counter()

    with torch.enable_grad() if args.enable_grad else torch.no_grad():
        merged = algorithm.run(pool)
    t_merge = time.perf_counter()

    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in merged.state_dict().items()}
    save_file(state, str(args.out / "model.safetensors"), {"format": "pt"})
    t_save = time.perf_counter()
    from merge_once import print_phases  # this folder (no fusion_bench import at module level)

    return print_phases(T_START, t_imports, t_merge, t_save)


if __name__ == "__main__":
    main()
