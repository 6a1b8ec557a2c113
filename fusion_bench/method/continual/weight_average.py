"""Continual weight averaging (FusionBench's ``ContinualWeightAverageForCLIP``): the running mean
of the experts seen, θ_t = (t−1)/t · θ_{t−1} + 1/t · θ_t^expert, θ_1 = the first expert.

After the last expert it is the simple average (order-invariant, up to float rounding).

Run: ``fusion_bench method=continual/weight_average``
Memory: θ0 (lazy) + the running mean update (1 image tower) + one expert tensor at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from fusion_bench.method.base import Context, SequentialMerge, key_progress
from fusion_bench.method.continual import RunningUpdate
from fusion_bench.tensor_ops import StateDict


@dataclass(frozen=True)
class ContinualWeightAverage(SequentialMerge[RunningUpdate]):
    exclude_keys: list[str] = field(default_factory=list)  # fnmatch patterns kept at θ0

    def start(self, pretrained: StateDict, context: Context | None = None) -> RunningUpdate:
        return RunningUpdate(pretrained)

    def absorb(self, state: RunningUpdate, name: str, expert: StateDict) -> RunningUpdate:
        t = len(state.seen) + 1  # this expert's position

        def combine(key: str, tau: Tensor, previous: Tensor | None) -> Tensor:
            return tau if previous is None else previous + (tau - previous) / t

        state.absorb(
            name, expert, self.exclude_keys, combine, key_progress(f"continual WA: {name}")
        )
        return state

    def merged(self, state: RunningUpdate) -> dict[str, Tensor]:
        return state.model(1.0, self.exclude_keys)
