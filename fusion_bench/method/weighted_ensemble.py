"""Weighted ensemble (baseline): logits = Σ_i w_i logits_i(x), with w_i / Σ_j w_j if ``normalize``.

``weights``: one per expert in the pool's order; ``null`` gives 1/N each (the simple ensemble).

Run: ``fusion_bench method=weighted_ensemble method.weights=[0.7,0.3]``
Memory: all N image towers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import EnsembleMethod


def weighted_logits(logits: Tensor, weights: Sequence[float], normalize: bool = True) -> Tensor:
    """(N, B, C), N weights -> (B, C)."""
    w = torch.as_tensor(list(weights), dtype=logits.dtype, device=logits.device)
    if normalize:
        w = w / w.sum()
    return (w.view(-1, 1, 1) * logits).sum(dim=0)


@dataclass(frozen=True)
class WeightedEnsemble(EnsembleMethod):
    weights: list[float] | None = None  # one per expert, in the pool's order; None = 1/N each
    normalize: bool = True  # divide by Σ w (FusionBench's default)

    def combiner(self, names):
        n = len(names)
        weights = [float(w) for w in self.weights] if self.weights is not None else [1.0 / n] * n
        if len(weights) != n:
            raise FusionBenchError(
                f"method.weights has {len(weights)} values for {n} experts {list(names)}: give "
                "one weight per expert, in that order."
            )
        if self.normalize and sum(weights) == 0:
            raise FusionBenchError("method.weights sum to 0: they cannot be normalised.")
        return partial(weighted_logits, weights=weights, normalize=self.normalize)
