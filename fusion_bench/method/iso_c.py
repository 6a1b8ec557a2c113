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

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fusion_bench.method.base import Experts, Progress, StateDictMerge
from fusion_bench.spectral import polar_factor
from fusion_bench.tensor_ops import (
    StateDict,
    is_excluded,
    map_keys,
    parallel_map,
    task_vector_sum,
)


@dataclass(frozen=True)
class IsoC(StateDictMerge):
    scaling_factor: float = 1.0  # α in θ0 + α Δ_iso; the paper selects it on validation data
    # 2-D keys averaged instead of flattened (the reference excludes the text projection)
    average_keys: list[str] = field(default_factory=lambda: ["*text_projection*"])
    exclude_keys: list[str] = field(default_factory=list)  # fnmatch patterns kept at θ0

    def merge(self, pretrained: StateDict, experts: Experts, progress: Progress = None):
        alpha = self.scaling_factor
        window = 2 * torch.get_num_threads()  # 2-D keys summed, then decomposed together
        # (θ0, float64 Σ τ, output tensor) of the 2-D keys not yet flattened
        waiting: list[tuple[Tensor, Tensor, Tensor]] = []

        def flatten(item: tuple[Tensor, Tensor, Tensor]) -> None:  # out = θ0 + α s̄ U Vᵀ
            base, total, out = item
            orthogonal, singular_values = polar_factor(total)
            out.copy_(base + (alpha * singular_values.mean()) * orthogonal)

        def merge_key(key: str, base: Tensor) -> Tensor:
            if base.dim() != 2 or is_excluded(key, self.average_keys):
                return base + alpha * (task_vector_sum(experts, key, base) / len(experts))
            out = torch.empty_like(base)  # filled when its window is decomposed
            waiting.append((base, task_vector_sum(experts, key, base, torch.float64), out))
            if len(waiting) >= window:
                parallel_map(flatten, waiting)
                waiting.clear()
            return out

        out = map_keys(pretrained, merge_key, self.exclude_keys, progress)
        parallel_map(flatten, waiting)
        return out
