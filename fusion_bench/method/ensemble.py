"""Output ensembles: a :class:`ZeroShotClassifier` whose logits combine the experts' logits.

Shared by ``simple_ensemble``, ``weighted_ensemble`` and ``max_model_predictor``. All experts use
the pool's one text tower, so they share the task's zero-shot head and logit scale, and their
logits are directly comparable. ``encoder`` is an ``nn.ModuleList`` of the experts' towers, so the
evaluator's ``classifier.encoder.to(device)`` moves them all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fusion_bench.modelpool.base import ZeroShotClassifier


@dataclass
class EnsembleClassifier(ZeroShotClassifier):
    members: list[ZeroShotClassifier] = field(default_factory=list)
    combine: Callable[[Tensor], Tensor] | None = None  # (N, B, C) logits -> (B, C)

    def logits(self, images: Tensor, head: Tensor) -> Tensor:
        stacked = torch.stack([m.logits(images, head) for m in self.members])  # (N, B, C)
        return self.combine(stacked)


def ensemble_classifier(modelpool, combine: Callable[[Tensor], Tensor]) -> EnsembleClassifier:
    """All experts as zero-shot classifiers (N image towers in memory), combined by ``combine``."""
    members = [
        modelpool.classifier(modelpool.build_encoder(modelpool.expert(name)))
        for name in modelpool.expert_names
    ]
    first = members[0]
    return EnsembleClassifier(
        encoder=nn.ModuleList([m.encoder for m in members]),
        features=first.features,
        zero_shot_head=first.zero_shot_head,
        preprocess=first.preprocess,
        logit_scale=first.logit_scale,
        head_cache_key=first.head_cache_key,
        members=members,
        combine=combine,
    )
