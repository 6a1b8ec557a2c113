"""Weighted ensemble (baseline): logits = Σ_i w_i logits_i(x), with w_i / Σ_j w_j if ``normalize``.

``weights``: one per expert in the pool's order; ``null`` gives 1/N each (the simple ensemble).

Run: ``fusion_bench method=weighted_ensemble method.weights=[0.7,0.3]``
Memory: all N image towers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.ensemble import EnsembleClassifier, ensemble_classifier


def weighted_logits(logits: Tensor, weights: Sequence[float], normalize: bool = True) -> Tensor:
    """(N, B, C), N weights -> (B, C)."""
    w = torch.as_tensor(list(weights), dtype=logits.dtype, device=logits.device)
    if normalize:
        w = w / w.sum()
    return (w.view(-1, 1, 1) * logits).sum(dim=0)


class WeightedEnsemble:
    models_held = staticmethod(lambda n: float(n))

    def __init__(self, weights: list[float] | None = None, normalize: bool = True):
        self.weights = None if weights is None else [float(w) for w in weights]
        self.normalize = normalize

    def run(self, modelpool, fabric=None) -> EnsembleClassifier:
        n = len(modelpool.expert_names)
        weights = self.weights if self.weights is not None else [1.0 / n] * n
        if len(weights) != n:
            raise FusionBenchError(
                f"method.weights has {len(weights)} values for {n} experts "
                f"{modelpool.expert_names}: give one weight per expert, in that order."
            )
        if self.normalize and sum(weights) == 0:
            raise FusionBenchError("method.weights sum to 0: they cannot be normalised.")
        return ensemble_classifier(
            modelpool, lambda logits: weighted_logits(logits, weights, self.normalize)
        )
