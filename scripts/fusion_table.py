"""The tiny8 fusion table (docs/tiny8.md, "Fusing differently initialised towers"): parents,
ensemble, vanilla average and every fusion method on ``modelpool=tiny8_scratch``, test accuracy
before and after the same short fine-tuning, in one process through the Python API.

    python scripts/fusion_table.py [--finetune-steps 300] [--out fusion_table.json]

About 45 minutes on 2 CPU cores. Writes the rows as JSON after each row (a rerun resumes: rows
already in --out are kept; --only LABEL... reruns those) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import fusion_bench
from fusion_bench.paths import config_dir

HETERO = [
    "+modelpool.models.w128_seed3=fusion_bench:tiny8/scratch/w128_seed3.safetensors",
    "+modelpool.model_configs.w128_seed3=fusion_bench:tiny8/scratch/Tiny8-ViT-w128.json",
]
PAIR = ["~modelpool.models.seed2"]
LONG = {
    "finetune_steps": 1200
}  # a row with its own fine-tuning: run once, as given  # the papers' main setting: two parents
ROWS = [  # (label, method, hyper-parameters, extra pool overrides)
    ("parent seed0", "fusion/parent", {"name": "seed0"}, []),
    ("parent seed1", "fusion/parent", {"name": "seed1"}, []),
    ("parent seed2", "fusion/parent", {"name": "seed2"}, []),
    ("ensemble (3 towers)", "simple_ensemble", {}, []),
    ("vanilla average", "fusion/vanilla_average", {}, []),
    ("weight matching", "fusion/weight_matching", {}, []),
    ("activation matching", "fusion/activation_matching", {}, []),
    ("OT fusion, acts, Sinkhorn 0.08", "fusion/ot_fusion", {}, []),
    ("OT fusion, acts, EMD", "fusion/ot_fusion", {"solver": "emd"}, []),
    ("OT fusion, wts, Sinkhorn 0.06", "fusion/ot_fusion", {"cost": "wts", "reg": 0.06}, []),
    ("OT fusion, wts, EMD", "fusion/ot_fusion", {"cost": "wts", "solver": "emd"}, []),
    ("PLeaS, width 1.0", "fusion/pleas", {}, []),
    ("PLeaS, width 1.5", "fusion/pleas", {"width": 1.5}, []),
    ("ensemble (2 towers)", "simple_ensemble", {}, PAIR),
    ("vanilla average (2 towers)", "fusion/vanilla_average", {}, PAIR),
    ("weight matching (2 towers)", "fusion/weight_matching", {}, PAIR),
    ("OT fusion, acts, Sinkhorn 0.08 (2 towers)", "fusion/ot_fusion", {}, PAIR),
    ("PLeaS, width 1.0 (2 towers)", "fusion/pleas", {}, PAIR),
    ("parent seed0, 1200 fine-tuning steps", "fusion/parent", {"name": "seed0", **LONG}, []),
    ("OT fusion, acts, Sinkhorn 0.08, 1200 fine-tuning steps", "fusion/ot_fusion", LONG, []),
    ("parent w128_seed3", "fusion/parent", {"name": "w128_seed3"}, HETERO),
    (
        "OT fusion → width 128 (4 towers, anchor w128)",
        "fusion/ot_fusion",
        {"anchor": "w128_seed3"},
        HETERO,
    ),
]


def pools(extra: list[str]):
    with initialize_config_dir(str(config_dir()), version_base=None):
        cfg = compose(
            "config",
            ["modelpool=tiny8_scratch", "suite=tiny8", "taskpool.splits=[test]", *extra],
        )
    return instantiate(cfg.modelpool, _convert_="all"), instantiate(cfg.taskpool, _convert_="all")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--finetune-steps", type=int, default=300)
    ap.add_argument("--out", default="fusion_table.json")
    ap.add_argument("--only", nargs="*", help="labels to run (default: all)")
    args = ap.parse_args()
    out = Path(args.out)
    rows = json.loads(out.read_text()) if out.is_file() else []  # resume: finished rows kept
    done = {r["label"] for r in rows}
    for label, method, hp, extra in ROWS:
        if (args.only and label not in args.only) or (not args.only and label in done):
            continue
        rows = [r for r in rows if r["label"] != label]
        modelpool, taskpool = pools(extra)
        row = {"label": label, "method": method, "hyperparameters": hp}
        plan = (0, args.finetune_steps) if method != "simple_ensemble" else (0,)
        if "finetune_steps" in hp:
            plan = (hp["finetune_steps"],)
        for steps in plan:
            t = time.perf_counter()
            extra_hp = {"finetune_steps": steps} if steps and "finetune_steps" not in hp else {}
            metrics = fusion_bench.evaluate(method, modelpool, taskpool, **hp, **extra_hp)
            row[f"test_{steps}"] = metrics["test/avg_acc"]
            row[f"seconds_{steps}"] = time.perf_counter() - t
            print(
                f"{label:50s} ft {steps:4d}: {100 * metrics['test/avg_acc']:.1f} "
                f"({row[f'seconds_{steps}']:.0f} s)",
                flush=True,
            )
        rows.append(row)
        out.write_text(json.dumps(rows, indent=1))
    print(f"\n| model | test avg | after {args.finetune_steps} fine-tuning steps |\n|---|---|---|")
    for r in rows:
        before, after = r.get("test_0"), r.get(f"test_{args.finetune_steps}")
        print(
            f"| {r['label']} | {'—' if before is None else f'{100 * before:.1f}'} | "
            f"{'—' if after is None else f'{100 * after:.1f}'} |"
        )


if __name__ == "__main__":
    main()
