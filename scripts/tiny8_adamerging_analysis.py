"""Why does AdaMerging not beat task arithmetic on tiny8? Task by task.

Runs task-wise AdaMerging on tiny8 (the table's 300 steps; saved λ are reused when present) and
prints, per task, the learned λ_t and the test entropy and accuracy of the merged model for
three settings: zero-shot (λ = 0), task arithmetic at its validation-chosen λ = 0.2, and the
learned λ. AdaMerging can only help where lowering a task's prediction entropy raises its
accuracy; the table shows where that fails.

    python scripts/tiny8_adamerging_analysis.py [--steps 300] [--out /tmp/tiny8_ada]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusion_bench.method.adamerging import AdaMerging, load_lambdas  # noqa: E402
from fusion_bench.method.base import Context, pool_experts  # noqa: E402
from fusion_bench.method.task_arithmetic import TaskArithmetic  # noqa: E402
from fusion_bench.paths import config_dir  # noqa: E402
from fusion_bench.tensor_ops import mergeable_keys  # noqa: E402

TA_LAMBDA = 0.2  # task arithmetic's λ chosen on validation (docs/tiny8.md)


@torch.no_grad()
def per_task(classifier, taskpool) -> dict[str, tuple[float, float]]:
    """task -> (mean test entropy in nats, test accuracy)."""
    out = {}
    for task in taskpool.tasks:
        data = taskpool.data
        head = data.zero_shot_head(classifier, task, torch.device("cpu"))
        ent, correct, total = 0.0, 0, 0
        ds = data.load_split(task, "test")
        for images, labels in data.loader(ds, task, classifier.preprocess, taskpool.batch_size):
            logits = classifier.logits(images, head)
            ent += float(-(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).sum())
            correct += int((logits.argmax(-1) == labels).sum())
            total += len(labels)
        out[task] = (ent / total, correct / total)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=Path("/tmp/tiny8_ada"))
    args = ap.parse_args()
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        cfg = compose("config", overrides=["logger=none"])
    pool = instantiate(cfg.modelpool, _convert_="all")
    taskpool = instantiate(cfg.taskpool, _convert_="all")
    names = list(pool.expert_names)
    pre, experts = pool.pretrained(), pool_experts(pool)

    stem = args.out / f"task_wise_{args.steps}"
    if not stem.with_suffix(".json").is_file():
        method = AdaMerging(
            granularity="task", max_steps=args.steps, save_weights=str(stem), seed=0
        )
        method.merge(pool, taskpool.data, Context())
    keys = list(mergeable_keys(pre))
    lambdas = load_lambdas(str(stem.with_suffix(".json")), names, keys, None)

    def evaluate(weights) -> dict[str, tuple[float, float]]:
        merged = TaskArithmetic(scaling_factor=[float(w) for w in weights]).merge(pre, experts)
        return per_task(pool.classifier(pool.build_encoder(merged)), taskpool)

    settings = {
        "zero-shot": evaluate([0.0] * len(names)),
        f"TA λ={TA_LAMBDA}": evaluate([TA_LAMBDA] * len(names)),
        "AdaMerging": evaluate(lambdas.tolist()),
    }
    tasks = list(taskpool.tasks)
    print("| task | learned λ_t | " + " | ".join(f"{s} H / acc" for s in settings) + " |")
    print("|---|---|" + "---|" * len(settings))
    for task in tasks:
        lam = lambdas[names.index(task)].item() if task in names else float("nan")
        cells = [f"{r[task][0]:.3f} / {100 * r[task][1]:.1f}" for r in settings.values()]
        print(f"| {task} | {lam:.3f} | " + " | ".join(cells) + " |")
    means = [
        (sum(r[t][0] for t in tasks) / len(tasks), sum(r[t][1] for t in tasks) / len(tasks))
        for r in settings.values()
    ]
    print(
        f"| mean | {lambdas.mean().item():.3f} | "
        + " | ".join(f"{h:.3f} / {100 * a:.1f}" for h, a in means)
        + " |"
    )


if __name__ == "__main__":
    main()
