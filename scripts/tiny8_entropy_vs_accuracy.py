"""Is prediction entropy a usable proxy for accuracy on tiny8? (Why AdaMerging does or doesn't help.)

AdaMerging chooses merging coefficients by minimising the entropy of the merged model's
predictions on unlabeled test images; that only helps where lower entropy means higher accuracy.
This script merges tiny8 with task arithmetic over a grid of λ and prints, per λ, the mean test
entropy and accuracy over the 8 tasks, and their correlation across the grid.

    python scripts/tiny8_entropy_vs_accuracy.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusion_bench.method.base import pool_experts  # noqa: E402
from fusion_bench.method.task_arithmetic import TaskArithmetic  # noqa: E402
from fusion_bench.paths import config_dir  # noqa: E402

GRID = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0]


@torch.no_grad()
def entropy_and_accuracy(classifier, taskpool) -> tuple[float, float]:
    entropies, accuracies = [], []
    for task in taskpool.tasks:
        data = taskpool.data
        head = data.zero_shot_head(classifier, task, torch.device("cpu"))
        ds = data.load_split(task, "test")
        ent_sum, correct, total = 0.0, 0, 0
        for images, labels in data.loader(ds, task, classifier.preprocess, taskpool.batch_size):
            logits = classifier.logits(images, head)
            p = logits.softmax(-1)
            ent_sum += float(-(p * p.clamp_min(1e-12).log()).sum(-1).sum())
            correct += int((logits.argmax(-1) == labels).sum())
            total += len(labels)
        entropies.append(ent_sum / total)
        accuracies.append(correct / total)
    return sum(entropies) / len(entropies), sum(accuracies) / len(accuracies)


def main() -> None:
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        cfg = compose("config", overrides=["logger=none"])
    pool = instantiate(cfg.modelpool, _convert_="all")
    taskpool = instantiate(cfg.taskpool, _convert_="all")
    experts = pool_experts(pool)
    rows = []
    print("| λ | mean test entropy (nats) | mean test accuracy (%) |\n|---|---|---|")
    for lam in GRID:
        merged = TaskArithmetic(scaling_factor=lam).merge(pool.pretrained(), experts)
        ent, acc = entropy_and_accuracy(pool.classifier(pool.build_encoder(merged)), taskpool)
        rows.append((ent, acc))
        print(f"| {lam:.1f} | {ent:.3f} | {100 * acc:.1f} |", flush=True)
    ent = torch.tensor([r[0] for r in rows])
    acc = torch.tensor([r[1] for r in rows])
    corr = torch.corrcoef(torch.stack([ent, acc]))[0, 1]
    print(
        f"\nPearson correlation of entropy and accuracy across λ: {corr:.2f} "
        "(AdaMerging needs it clearly negative)"
    )


if __name__ == "__main__":
    main()
