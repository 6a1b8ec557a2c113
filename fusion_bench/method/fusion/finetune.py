"""The short fine-tuning after fusion (Imfeld et al.: a fused model "after a surprisingly short
finetuning" beats its parents): the fused tower is trained as the pool's models were, as one joint
classifier of the pool's tasks, each task's images against that task's frozen zero-shot head.

AdamW (weight decay 0.1), linear warm-up over the first 10 % of steps then cosine decay, batch of
one task per step (round robin over the tasks), gradient-norm clipping at 1.0, the training
split's images in a seeded shuffled order, no augmentation. Memory: the tower, its gradients and
AdamW's two moments (4 towers) plus one batch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fusion_bench.errors import FusionBenchError


def labelled_batches(data, task: str, preprocess, batch_size: int, seed: int) -> Iterator:
    """Endless (images, labels) batches of ``task``'s training split, reshuffled every pass."""
    ds = data.load_split(task, "train")
    for epoch in itertools.count():
        shuffled = ds.shuffle(seed=seed + epoch, keep_in_memory=True)
        yield from data.loader(shuffled, task, preprocess, batch_size)


def finetune(
    pool,
    state: Mapping[str, Tensor],
    data,
    context,
    tasks: Sequence[str],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> dict[str, Tensor]:
    """``state`` after ``steps`` steps of joint training on ``tasks`` (``steps`` 0: unchanged)."""
    from tqdm.auto import tqdm

    if steps <= 0:
        return dict(state)
    if not tasks:
        raise FusionBenchError(
            "Fine-tuning after fusion needs the pool's tasks: set modelpool.tasks."
        )
    device = context.device
    steps = 1 if context.fast_dev_run else steps
    encoder = pool.build_encoder(state).to(device).train()
    classifier = pool.classifier(encoder)
    heads = {t: data.zero_shot_head(classifier, t, device) for t in tasks}
    streams = {
        t: labelled_batches(data, t, classifier.preprocess, batch_size, seed + 1000 * i)
        for i, t in enumerate(tasks)
    }
    params = [p for p in encoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))),
    )
    with torch.enable_grad():
        for step in tqdm(range(steps), desc="fine-tuning the fused model", leave=False):
            task = tasks[step % len(tasks)]
            images, labels = next(streams[task])
            logits = classifier.logits(images.to(device), heads[task])
            loss = F.cross_entropy(logits, labels.to(device))
            if not torch.isfinite(loss):
                raise FusionBenchError(
                    f"Fine-tuning diverged at step {step} (loss {loss.item()}): lower "
                    "method.finetune_lr."
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
    return {k: v.detach().cpu() for k, v in encoder.state_dict().items()}


def finish(method, pool, state: Mapping[str, Tensor], data, context, tasks=None):
    """``state`` after the fine-tuning ``method`` asks for (its ``finetune_steps``,
    ``finetune_lr``, ``finetune_batch_size`` and ``seed``), on ``tasks`` (default: the pool's)."""
    if tasks is None:
        tasks = list(getattr(pool, "tasks", []) or [])
    return finetune(
        pool,
        state,
        data,
        context,
        tasks,
        method.finetune_steps,
        method.finetune_lr,
        method.finetune_batch_size,
        method.seed,
    )
