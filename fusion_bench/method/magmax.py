"""MagMax (Marczak et al., "MagMax: Leveraging Model Merging for Seamless Continual Learning",
ECCV 2024): per entry, keep the task-vector entry of largest magnitude across the experts.

τ_max[j] = τ_{i*}[j] with i* = argmax_i |τ_i[j]| (the first expert on ties); θ = θ0 + λ τ_max.
The default λ = 0.5 is the one FusionBench uses, taken from the authors' 8-dataset script.

Run: ``fusion_bench method=magmax method.scaling_factor=0.5``
Memory: the merged output + the running selection and one expert tensor of the current key.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fusion_bench.method.base import merge_pool
from fusion_bench.tensor_ops import StateDict, expert_labels, expert_tensor, map_keys


def magmax(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    scaling_factor: float = 0.5,
    exclude_keys: Sequence[str] = (),
    names: Sequence[str] | None = None,
    progress=None,
) -> dict[str, Tensor]:
    names = expert_labels(finetuned, names)

    def merge_key(key: str, base: Tensor) -> Tensor:
        best = torch.zeros_like(base)
        for expert, name in zip(finetuned, names, strict=True):
            tau = expert_tensor(expert, key, base, name) - base
            best = torch.where(tau.abs() > best.abs(), tau, best)  # strict: first expert wins ties
        return base + scaling_factor * best

    return map_keys(pretrained, merge_key, exclude_keys, progress)


class MagMax:
    models_held = 1.0

    def __init__(self, scaling_factor: float = 0.5, exclude_keys: list[str] | None = None):
        self.scaling_factor = scaling_factor
        self.exclude_keys = list(exclude_keys or [])

    def run(self, modelpool, fabric=None) -> dict[str, Tensor]:
        return merge_pool(magmax, modelpool, "magmax", self.scaling_factor, self.exclude_keys)
