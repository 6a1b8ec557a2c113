"""Continual task arithmetic (the continual baseline of the OPCM paper, as FusionBench's
``ContinualTaskArithmeticForCLIP``): θ_t = θ_{t−1} + λ τ_t, θ_0 = the pretrained model.

After the last expert it is task arithmetic over all experts (order-invariant); λ is the same for
every step, so the merged update grows with the number of experts (what OPCM's normalisation
avoids). Default λ = 0.3 (FusionBench).

Run: ``fusion_bench method=continual/task_arithmetic method.scaling_factor=0.3``
Memory: θ0 (lazy) + the running update (1 image tower) + one expert tensor at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from fusion_bench.method.base import Context, SequentialMerge, key_progress
from fusion_bench.method.continual import RunningUpdate
from fusion_bench.tensor_ops import StateDict


@dataclass(frozen=True)
class ContinualTaskArithmetic(SequentialMerge[RunningUpdate]):
    scaling_factor: float = 0.3  # λ added per expert (FusionBench's default)
    exclude_keys: list[str] = field(default_factory=list)  # fnmatch patterns kept at θ0

    def start(self, pretrained: StateDict, context: Context | None = None) -> RunningUpdate:
        return RunningUpdate(pretrained)

    def absorb(self, state: RunningUpdate, name: str, expert: StateDict) -> RunningUpdate:
        def combine(key: str, tau: Tensor, previous: Tensor | None) -> Tensor:
            return tau if previous is None else previous + tau

        state.absorb(
            name, expert, self.exclude_keys, combine, key_progress(f"continual TA: {name}")
        )
        return state

    def merged(self, state: RunningUpdate) -> dict[str, Tensor]:
        return state.model(self.scaling_factor, self.exclude_keys)
