"""Simple ensemble (baseline): the mean of the experts' logits, logits = (1/N) Σ_i logits_i(x).

Not a merge: all N experts run on every image. FusionBench averages the experts' encoder outputs
instead; here every expert is a complete zero-shot classifier and the logits are averaged.

Run: ``fusion_bench method=simple_ensemble``
Memory: all N image towers.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from fusion_bench.method.base import EnsembleMethod


def mean_logits(logits: Tensor) -> Tensor:
    """(N, B, C) -> (B, C)."""
    return logits.mean(dim=0)


@dataclass(frozen=True)
class SimpleEnsemble(EnsembleMethod):
    def combiner(self, names):
        return mean_logits
