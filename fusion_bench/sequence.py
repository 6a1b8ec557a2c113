"""The sequential (continual merging) protocol, for methods of kind ``sequential``.

Experts arrive in an order (the pool's, a given one, or the pool's shuffled by a seed); after each
step t the merged model is evaluated on the tasks seen so far. Reported, as in the OPCM paper:
per step the average accuracy over the seen tasks and each seen task's accuracy; at the end the
final average accuracy and the backward transfer

    BWT = 1/(T−1) · Σ_{i<T} (acc_{T,i} − acc_{i,i})

(acc_{t,i}: accuracy on task i after step t). Settings: ``sequence.*`` in ``conf/config.yaml``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from fusion_bench.errors import FusionBenchError, did_you_mean


def arrival_order(
    names: Sequence[str], order: Sequence[str] | None, shuffle_seed: int | None
) -> list[str]:
    """The experts' arrival order; checked before any work."""
    if order is None:
        result = list(names)
    else:
        result = [str(n) for n in order]
        unknown = [n for n in result if n not in names]
        if unknown:
            hint = did_you_mean(unknown[0], names)
            raise FusionBenchError(
                f"sequence.order names {unknown}, which the model pool does not have (it has "
                f"{list(names)}).{hint} Fix sequence.order."
            )
        duplicates = sorted({n for n in result if result.count(n) > 1})
        if duplicates:
            raise FusionBenchError(
                f"sequence.order lists {duplicates} more than once: each expert arrives once."
            )
    if shuffle_seed is not None:
        random.Random(int(shuffle_seed)).shuffle(result)
    if not result:
        raise FusionBenchError("The sequence is empty: the model pool has no expert.")
    return result


def backward_transfer(accuracy: Sequence[Mapping[str, float]], order: Sequence[str]) -> float:
    """BWT from ``accuracy[t][task]`` (after step t) for the tasks in arrival ``order``."""
    last = len(accuracy) - 1
    terms = [
        accuracy[last][task] - accuracy[i][task]
        for i, task in enumerate(order[:last])
        if task in accuracy[i] and task in accuracy[last]
    ]
    return sum(terms) / len(terms) if terms else 0.0


def summarize(
    order: Sequence[str], step_metrics: Sequence[Mapping[str, float]], splits: Sequence[str]
) -> dict:
    """The continual part of the report: per step, then the final average and BWT per split."""
    steps = []
    for t, (name, metrics) in enumerate(zip(order, step_metrics, strict=True)):
        steps.append({"step": t + 1, "expert": name, "metrics": dict(metrics)})
    out = {"order": list(order), "steps": steps, "final_avg_acc": {}, "bwt": {}}
    for split in splits:
        accuracy = [
            {
                task: m[f"{split}/{task}/acc"]
                for task in order[: t + 1]
                if f"{split}/{task}/acc" in m
            }
            for t, m in enumerate(step_metrics)
        ]
        out["final_avg_acc"][split] = step_metrics[-1].get(f"{split}/avg_acc")
        out["bwt"][split] = backward_transfer(accuracy, order)
    return out


def step_line(t: int, name: str, metrics: Mapping[str, float], splits: Sequence[str]) -> str:
    accs = ", ".join(f"{s} {100 * metrics[f'{s}/avg_acc']:.2f}%" for s in splits)
    return f"step {t}: + {name:<24} seen-task average: {accs}"


def write_plot(summary: dict, splits: Sequence[str], path: Path) -> Path:
    """Accuracy over the seen tasks vs step, as a small standalone SVG (no plotting library)."""
    width, height, pad = 480, 300, 40
    steps = summary["steps"]
    n = len(steps)
    colors = ["#1f77b4", "#d62728", "#2ca02c"]

    def xy(i: int, acc: float) -> str:
        x = pad + (width - 2 * pad) * (i / max(n - 1, 1))
        y = height - pad - (height - 2 * pad) * acc
        return f"{x:.1f},{y:.1f}"

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
        'stroke="black"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>',
        f'<text x="{width / 2}" y="{height - 8}" text-anchor="middle" font-size="12">'
        "step (experts merged)</text>",
        f'<text x="10" y="{pad - 12}" font-size="12">average accuracy over seen tasks</text>',
    ]
    for tick in (0.0, 0.5, 1.0):
        y = height - pad - (height - 2 * pad) * tick
        parts.append(
            f'<text x="{pad - 6}" y="{y + 4}" text-anchor="end" font-size="10">{tick:g}</text>'
        )
    for i in range(n):
        x = pad + (width - 2 * pad) * (i / max(n - 1, 1))
        parts.append(
            f'<text x="{x:.1f}" y="{height - pad + 14}" text-anchor="middle" font-size="10">{i + 1}</text>'
        )
    for k, split in enumerate(splits):
        points = [
            xy(i, s["metrics"][f"{split}/avg_acc"])
            for i, s in enumerate(steps)
            if f"{split}/avg_acc" in s["metrics"]
        ]
        color = colors[k % len(colors)]
        parts.append(
            f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{" ".join(points)}"/>'
        )
        parts.append(
            f'<text x="{width - pad}" y="{pad + 14 * k}" text-anchor="end" font-size="11" '
            f'fill="{color}">{split}</text>'
        )
    parts.append("</svg>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n")
    return path


def run_sequence(
    method,
    modelpool,
    taskpool,
    fabric,
    order: Sequence[str],
    evaluate_every_step: bool,
    save_step: Callable[[int, str, Mapping], None] | None,
    log: Callable[[str], None],
    log_metrics: Callable[[dict, int], None],
    context=None,
) -> tuple[Mapping, list[dict]]:
    """Feed the experts in ``order``; evaluate each intermediate model on the tasks seen so far.
    Returns (the final merged state dict, the metrics of steps 1 … T−1); the caller evaluates
    the final model on every task."""
    from fusion_bench.method.base import check_finite, merge_sequentially

    experts = {name: modelpool.expert(name) for name in order}
    step_metrics: list[dict] = []
    merged = None
    every_step = evaluate_every_step or save_step is not None
    steps = merge_sequentially(method, modelpool.pretrained(), experts, context, every_step)
    first = 1 if every_step else len(order)  # without every_step only the last model is built
    for t, (name, merged) in enumerate(steps, start=first):
        if save_step is not None:
            save_step(t, name, merged)
        if t == len(order) or not evaluate_every_step:
            continue
        seen = [task for task in order[:t] if task in taskpool.tasks]
        if not seen:
            step_metrics.append({})
            continue
        check_finite(merged)
        classifier = modelpool.classifier(modelpool.build_encoder(merged))
        metrics = taskpool.evaluate(classifier, fabric, tasks=seen)
        step_metrics.append(metrics)
        log(step_line(t, name, metrics, taskpool.splits))
        log_metrics({f"continual/{k}": v for k, v in metrics.items()}, t)
    return merged, step_metrics
