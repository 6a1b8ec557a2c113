"""Zero-shot baseline: evaluate the pretrained model on every task (no merging).

Run: ``fusion_bench method=pretrained``
Memory: the pretrained image tower, read lazily by the evaluator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fusion_bench.method.base import Experts, Progress, StateDictMerge
from fusion_bench.tensor_ops import StateDict


@dataclass(frozen=True)
class Pretrained(StateDictMerge):
    needs_experts: ClassVar[bool] = False  # the zero-shot model: no expert needed

    def merge(self, pretrained: StateDict, experts: Experts, progress: Progress = None):
        return pretrained

    def models_held(self, n_experts: int) -> float:
        return 0.0  # nothing beyond the evaluated model
