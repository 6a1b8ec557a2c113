"""Simple average ("model soup", Wortsman et al. 2022): θ = (1/N) Σ_i θ_i.

Computed as θ0 + Σ_i (1/N)(θ_i − θ0), which equals the plain mean and shares the streaming
implementation with task arithmetic. Non-floating tensors and ``exclude_keys`` come from θ0.

Run: ``fusion_bench method=simple_average``
Memory: the merged output + one running sum and one expert tensor of the current key: independent
of N.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from fusion_bench.method.base import merge_pool
from fusion_bench.tensor_ops import StateDict, add_weighted_task_vectors


def simple_average(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    exclude_keys: Sequence[str] = (),
    names: Sequence[str] | None = None,
    progress=None,
) -> dict[str, Tensor]:
    n = len(finetuned)
    return add_weighted_task_vectors(
        pretrained, finetuned, [1.0 / n] * n, names, exclude_keys, progress
    )


class SimpleAverage:
    models_held = 1.0  # the output; per-key temporaries are negligible

    def __init__(self, exclude_keys: list[str] | None = None):
        self.exclude_keys = list(exclude_keys or [])

    def run(self, modelpool, fabric=None) -> dict[str, Tensor]:
        return merge_pool(simple_average, modelpool, "simple_average", self.exclude_keys)
