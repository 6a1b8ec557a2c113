"""Iso-C: isotropic merging in the common subspace (Marczak et al., "No Task Left Behind:
Isotropic Model Merging with Common and Task-Specific Subspaces", ICML 2025).

For every 2-D weight: the task-arithmetic sum Δ = Σ_t τ_t = U diag(s) Vᵀ gets a flat spectrum,
every singular value replaced by their mean: Δ_iso = s̄ · U Vᵀ (s̄ = mean of the r = min(m, n)
singular values). Tensors that are not 2-D and the 2-D keys matched by ``average_keys`` (the
reference excludes ``text_projection``) get the mean of the task vectors. θ = θ0 + α Δ_iso;
α is chosen on validation data in the paper (sweep ``method.scaling_factor``).

``U Vᵀ`` and ``s`` come from the float64 eigen-decomposition of the smaller Gram matrix of Δ
(:func:`fusion_bench.tensor_ops.polar_factor`), the same quantities as the reference's
``torch.linalg.svd`` (tests check it against a dense SVD implementation of the paper's
equations). For a rank-deficient Δ the SVD's null-space vectors are arbitrary and the method is
not unique; here those directions get nothing.

Run: ``fusion_bench method=iso_c method.scaling_factor=1.0``
Key by key, expert by expert, the task-vector sums are streamed; every 2·threads 2-D keys, their
decompositions run together, spread over torch's threads
(:func:`fusion_bench.tensor_ops.parallel_map`). Memory: the output + the sums of at most 2·threads
keys + one key's Gram matrix and eigenvectors per thread: independent of N. Time: one
eigen-decomposition per 2-D tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fusion_bench.method.base import merge_pool
from fusion_bench.tensor_ops import (
    StateDict,
    expert_labels,
    is_excluded,
    map_keys,
    parallel_map,
    polar_factor,
    task_vector_sum,
)


def iso_c(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    scaling_factor: float = 1.0,
    average_keys: Sequence[str] = ("*text_projection*",),
    exclude_keys: Sequence[str] = (),
    names: Sequence[str] | None = None,
    progress=None,
) -> dict[str, Tensor]:
    names = expert_labels(finetuned, names)
    window = 2 * torch.get_num_threads()  # 2-D keys summed, then decomposed together
    waiting: list[tuple[Tensor, Tensor]] = []  # (θ0, Σ τ) of 2-D keys not yet flattened

    def flatten(item: tuple[Tensor, Tensor]) -> None:  # Σ τ becomes θ0 + α s̄ U Vᵀ, in place
        base, total = item
        orthogonal, singular_values = polar_factor(total)
        total.copy_(base + (scaling_factor * singular_values.mean()) * orthogonal)

    def merge_key(key: str, base: Tensor) -> Tensor:
        total = task_vector_sum(finetuned, key, base, names)
        if base.dim() != 2 or is_excluded(key, average_keys):
            return base + scaling_factor * (total / len(finetuned))
        waiting.append((base, total))  # the output holds ``total``; flattened in place later
        if len(waiting) >= window:
            parallel_map(flatten, waiting)
            waiting.clear()
        return total

    out = map_keys(pretrained, merge_key, exclude_keys, progress)
    parallel_map(flatten, waiting)
    return out


class IsoC:
    models_held = 1.0

    def __init__(
        self,
        scaling_factor: float = 1.0,
        average_keys: list[str] | None = None,
        exclude_keys: list[str] | None = None,
    ):
        self.scaling_factor = scaling_factor
        self.average_keys = list(["*text_projection*"] if average_keys is None else average_keys)
        self.exclude_keys = list(exclude_keys or [])

    def run(self, modelpool, fabric=None) -> dict[str, Tensor]:
        return merge_pool(
            iso_c, modelpool, "iso_c", self.scaling_factor, self.average_keys, self.exclude_keys
        )
