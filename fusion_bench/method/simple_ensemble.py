"""Simple ensemble (baseline): the mean of the experts' logits, logits = (1/N) Σ_i logits_i(x).

Not a merge: all N experts run on every image. FusionBench averages the experts' encoder outputs
instead; here every expert is a complete zero-shot classifier and the logits are averaged.

Run: ``fusion_bench method=simple_ensemble``
Memory: all N image towers.
"""

from __future__ import annotations

from torch import Tensor

from fusion_bench.method.ensemble import EnsembleClassifier, ensemble_classifier


def mean_logits(logits: Tensor) -> Tensor:
    """(N, B, C) -> (B, C)."""
    return logits.mean(dim=0)


class SimpleEnsemble:
    models_held = staticmethod(lambda n: float(n))

    def run(self, modelpool, fabric=None) -> EnsembleClassifier:
        return ensemble_classifier(modelpool, mean_logits)
