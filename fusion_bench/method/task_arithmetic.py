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

from collections.abc import Sequence

from torch import Tensor

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import merge_pool
from fusion_bench.tensor_ops import StateDict, add_weighted_task_vectors


def task_arithmetic(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    scaling_factor: float | Sequence[float],
    exclude_keys: Sequence[str] = (),
    names: Sequence[str] | None = None,
    progress=None,
) -> dict[str, Tensor]:
    if isinstance(scaling_factor, (int, float)):
        weights = [float(scaling_factor)] * len(finetuned)
    else:
        weights = [float(w) for w in scaling_factor]
        if len(weights) != len(finetuned):
            raise FusionBenchError(
                f"scaling_factor has {len(weights)} values for {len(finetuned)} experts: give one "
                "value, or one per expert in the pool's order."
            )
    return add_weighted_task_vectors(pretrained, finetuned, weights, names, exclude_keys, progress)


class TaskArithmetic:
    models_held = 1.0

    def __init__(
        self, scaling_factor: float | list[float] = 0.3, exclude_keys: list[str] | None = None
    ):
        self.scaling_factor = scaling_factor
        self.exclude_keys = list(exclude_keys or [])

    def run(self, modelpool, fabric=None) -> dict[str, Tensor]:
        scaling = self.scaling_factor
        if not isinstance(scaling, (int, float)):
            scaling = list(scaling)
        return merge_pool(task_arithmetic, modelpool, "task_arithmetic", scaling, self.exclude_keys)
