"""Simple average ("model soup", Wortsman et al. 2022): θ = (1/N) Σ_i θ_i.

Computed as θ0 + Σ_i (1/N)(θ_i − θ0), which equals the plain mean and shares the streaming
implementation with task arithmetic. Non-floating tensors and ``exclude_keys`` come from θ0.

Run: ``fusion_bench method=simple_average``
Memory: the merged output + one running sum and one expert tensor of the current key: independent
of N.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fusion_bench.method.base import Experts, Progress, StateDictMerge
from fusion_bench.tensor_ops import StateDict, add_weighted_task_vectors


@dataclass(frozen=True)
class SimpleAverage(StateDictMerge):
    exclude_keys: list[str] = field(default_factory=list)  # fnmatch patterns kept at θ0

    def merge(self, pretrained: StateDict, experts: Experts, progress: Progress = None):
        n = len(experts)
        weights = [1.0 / n] * n
        return add_weighted_task_vectors(pretrained, experts, weights, self.exclude_keys, progress)
