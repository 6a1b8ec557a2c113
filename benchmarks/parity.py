"""Reference parity: the same synthetic pool merged by this project and by FusionBench, compared.

Builds (once, cached) a synthetic pool of ``--arch`` (``s``: a small CLIP with ViT-B/32's key names,
fast; ``b32``: the real shapes) with ``benchmarks/pools.py``, merges its first N experts with our
method (``benchmarks/merge_once.py``: the YAML + ``key=value`` overrides) and with FusionBench's
class (``benchmarks/fusionbench_reference.py`` under ``--reference-python``, a venv with
``pip install fusion-bench==0.2.33``: the two packages share the name ``fusion_bench``), then
compares the two merged state dicts key by key: relative error ‖ours − ref‖ / ‖ref‖ (Frobenius).
Exits 1 when the worst key is above ``--tol``. The last stdout line is JSON.

Run:
  python benchmarks/parity.py --reference-python /tmp/fbref/bin/python \\
      --ours iso_cts scaling_factor=1.0 \\
      --reference fusion_bench.method:IsotropicMergingInCommonAndTaskSubspace \\
      --reference-kwargs '{"scaling_factor": 1.0, "common_space_fraction": 0.8}'
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def compare(ours: dict, ref: dict) -> dict:
    """Per-key relative Frobenius error of ``ours`` against ``ref`` (float64), and the worst."""
    import torch

    missing = sorted(set(ref) ^ set(ours))
    errors = {}
    for key, r in ref.items():
        if key not in ours or not r.is_floating_point():
            continue
        o, r = ours[key].double(), r.double()
        errors[key] = float((o - r).norm() / r.norm().clamp_min(1e-30))
    worst = max(errors, key=errors.get)
    return {
        "max_rel_error": errors[worst],
        "worst_key": worst,
        "median_rel_error": float(torch.tensor(list(errors.values())).median()),
        "keys_compared": len(errors),
        "keys_not_in_both": missing,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-python", required=True, help="python of the FusionBench venv")
    parser.add_argument("--ours", nargs="+", required=True, help="method name, then key=value")
    parser.add_argument("--reference", required=True, help="FusionBench module:Class")
    parser.add_argument("--reference-kwargs", default="{}", help="JSON constructor arguments")
    parser.add_argument("--arch", default="s", help="benchmarks/pools.py architecture")
    parser.add_argument("--n", type=int, default=4, help="merge the first N experts")
    parser.add_argument("--seed", type=int, default=None, help="torch seed for the reference")
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument(
        "--reference-grad", action="store_true", help="the reference optimises with autograd"
    )
    args = parser.parse_args(argv)

    sys.path.insert(0, str(HERE))
    from pools import build_pool
    from safetensors.torch import load_file as load_state_dict_file

    pool = build_pool(args.arch, args.n, log=lambda msg: print(msg, file=sys.stderr))
    env = dict(os.environ, PYTHONPATH=str(HERE), HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    with tempfile.TemporaryDirectory() as tmp:
        ours_dir, ref_dir = Path(tmp, "ours"), Path(tmp, "ref")
        name, overrides = args.ours[0], args.ours[1:]
        run = [sys.executable, str(HERE / "merge_once.py"), name, str(pool), str(args.n)]
        subprocess.run([*run, str(ours_dir), *overrides], check=True, env=env, cwd=REPO)
        ref = [args.reference_python, str(HERE / "fusionbench_reference.py"), args.reference]
        ref += [str(pool), str(args.n), str(ref_dir), "--kwargs", args.reference_kwargs]
        if args.seed is not None:
            ref += ["--seed", str(args.seed)]
        if args.reference_grad:
            ref.append("--enable-grad")
        subprocess.run(ref, check=True, env=env, cwd=tmp)
        result = compare(
            load_state_dict_file(ours_dir / "model.safetensors"),
            load_state_dict_file(ref_dir / "model.safetensors"),
        )
    result |= {"ours": args.ours, "reference": args.reference, "arch": args.arch, "n": args.n}
    result["reference_kwargs"] = json.loads(args.reference_kwargs)
    result["ok"] = result["max_rel_error"] <= args.tol and not result["keys_not_in_both"]
    print(json.dumps(result))
    if not result["ok"]:
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
