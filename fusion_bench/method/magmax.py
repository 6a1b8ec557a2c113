"""MagMax (Marczak et al., "MagMax: Leveraging Model Merging for Seamless Continual Learning",
ECCV 2024): per entry, keep the task-vector entry of largest magnitude across the experts.

τ_max[j] = τ_{i*}[j] with i* = argmax_i |τ_i[j]| (the first expert on ties); θ = θ0 + λ τ_max.
The default λ = 0.5 is the one FusionBench uses, taken from the authors' 8-dataset script.

Run: ``fusion_bench method=magmax method.scaling_factor=0.5``
Memory: the merged output + the running selection and one expert tensor of the current key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fusion_bench.method.base import Experts, Progress, StateDictMerge
from fusion_bench.tensor_ops import StateDict, expert_tensor, map_keys


@dataclass(frozen=True)
class MagMax(StateDictMerge):
    scaling_factor: float = 0.5  # the authors' 8-dataset script and FusionBench use 0.5
    exclude_keys: list[str] = field(default_factory=list)  # fnmatch patterns kept at θ0

    def merge(self, pretrained: StateDict, experts: Experts, progress: Progress = None):
        def merge_key(key: str, base: Tensor) -> Tensor:
            best = torch.zeros_like(base)
            for name, expert in experts.items():
                tau = expert_tensor(expert, key, base, name) - base
                best = torch.where(tau.abs() > best.abs(), tau, best)  # first expert wins ties
            return base + self.scaling_factor * best

        return map_keys(pretrained, merge_key, self.exclude_keys, progress)
