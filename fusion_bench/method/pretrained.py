"""Zero-shot baseline: evaluate the pretrained model on every task (no merging).

Run: ``fusion_bench method=pretrained``
Memory: the pretrained image tower, read lazily by the evaluator.
"""

from __future__ import annotations

from fusion_bench.checkpoint import LazyStateDict


class Pretrained:
    models_held = 0.0  # nothing beyond the evaluated model

    def run(self, modelpool, fabric=None) -> LazyStateDict:
        return modelpool.pretrained()
