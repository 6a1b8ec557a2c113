"""Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023).

θ = θ0 + λ Σ_i τ_i with τ_i = θ_i − θ0; ``scaling_factor`` is one λ or one λ_i per expert (in the
pool's expert order). λ is normally chosen on validation data: sweep it with
``fusion_bench -m method.scaling_factor=0.1,0.2,...,1.0 taskpool.splits=[validation,test]`` and
``fusion_bench-report <sweep dir>``.

Run: ``fusion_bench method=task_arithmetic method.scaling_factor=0.3``
Memory: the merged output + one running sum and one expert tensor of the current key: independent
of N.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fusion_bench.method.base import Experts, Progress, StateDictMerge, per_expert
from fusion_bench.tensor_ops import StateDict, add_weighted_task_vectors


@dataclass(frozen=True)
class TaskArithmetic(StateDictMerge):
    scaling_factor: float | list[float] = 0.3  # one λ, or one per expert in the pool's order
    exclude_keys: list[str] = field(default_factory=list)  # fnmatch patterns kept at θ0

    def merge(self, pretrained: StateDict, experts: Experts, progress: Progress = None):
        weights = per_expert(self.scaling_factor, list(experts), "scaling_factor")
        return add_weighted_task_vectors(pretrained, experts, weights, self.exclude_keys, progress)
