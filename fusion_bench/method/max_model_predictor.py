"""Max-model predictor (baseline): per image and class, the largest logit over the experts,
logits_c = max_i logits_ic(x).

Its prediction argmax_c max_i logits_ic is the prediction of the expert whose top logit is
largest, i.e. the most confident expert measured in logits (all experts share the head and logit
scale). FusionBench takes the same elementwise max, over the encoders' outputs instead of logits.

Run: ``fusion_bench method=max_model_predictor``
Memory: all N image towers.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from fusion_bench.method.base import EnsembleMethod


def max_logits(logits: Tensor) -> Tensor:
    """(N, B, C) -> (B, C)."""
    return logits.max(dim=0).values


@dataclass(frozen=True)
class MaxModelPredictor(EnsembleMethod):
    def combiner(self, names):
        return max_logits
