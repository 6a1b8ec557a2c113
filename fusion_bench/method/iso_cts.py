"""Iso-CTS: isotropic merging in common and task-specific subspaces (Marczak et al., "No Task Left
Behind: Isotropic Model Merging with Common and Task-Specific Subspaces", ICML 2025).

For every 2-D weight, with N experts, task matrices τ_t = θ_t − θ0 and r = min(m, n):

1. **sizes** (as the authors' code and FusionBench): k₀ = ⌊f·r⌋ for ``common_space_fraction`` f;
   each task gets d = round((r − k₀) / N) directions (Python's round, half to even) and the common
   subspace the other k = r − N·d, so that the two parts fill exactly r directions;
2. **common subspace**: the top-k singular triplets (U_c, s_c, V_c) of the task-arithmetic sum
   Δ = Σ_t τ_t;
3. **task-specific subspaces**: each task's residual outside the common left subspace,
   τ̄_t = τ_t − U_c U_cᵀ τ_t, contributes its top-d singular triplets (Ū_t, s̄_t, V̄_t);
4. **orthogonalise**: U = [U_c | Ū_1 … Ū_N] (m×r) and V = [V_c; V̄_1; …; V̄_N] (r×n) are replaced
   by their orthogonal polar factors U⊥, V⊥ (P Qᵀ of P Σ Qᵀ);
5. **isotropic spectrum**: every singular value is the mean σ̄ of the r values kept
   (s_c, s̄_1 … s̄_N), Δ_iso = σ̄ · U⊥ V⊥, and θ = θ0 + α Δ_iso.

Tensors that are not 2-D and the 2-D keys matched by ``average_keys`` (the authors' code keeps
``text_projection`` out) get the mean of the task vectors. Where d = 0 (f = 1, or a rank too
small for one direction per task) step 3 adds nothing and the key is merged exactly as Iso-C
(:class:`fusion_bench.method.iso_c.IsoC`, the same kernel calls). α is chosen on validation data
in the paper (the authors sweep 0.1 … 3.0).

Every decomposition goes through the float64 spectral kernel (:mod:`fusion_bench.spectral`):
``top_singular_triplets`` for steps 2–3, ``polar_factor`` for step 4; the sum and the residuals
are formed in float64 from the float32 task vectors. Numerically zero directions (of Δ, of the
stacked bases, and of a residual, on the scale of its τ_t: ‖τ_t‖_F·max(m, n)·ε₆₄) get nothing
instead of the arbitrary vectors an SVD returns for them, and count as 0 in the mean; so task
vectors that lie inside the common subspace add nothing task-specific.

Run: ``fusion_bench method=iso_cts method.scaling_factor=1.0``
Memory: key by key. Per 2-D key: the float64 sum (read once, expert by expert), the
stacked U (m×r) and V (r×n) into which each task's d triplets are written (the N residual bases
fill r directions together, whatever N), and per worker thread one τ_t and its residual: a few
copies of the largest matrix, independent of N. Each expert's tensor of a 2-D key is read twice
(for the sum, then for its residual). Time: 1 + N + 2 decompositions per 2-D key, the N residual
ones and the two polar factors spread over torch's threads
(:func:`fusion_bench.tensor_ops.parallel_map`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import Experts, Progress, StateDictMerge, require_experts
from fusion_bench.spectral import EPS64, polar_factor, top_singular_triplets
from fusion_bench.tensor_ops import (
    StateDict,
    expert_tensor,
    is_excluded,
    map_keys,
    parallel_map,
    task_vector_sum,
)


def subspace_sizes(rank: int, n_tasks: int, fraction: float) -> tuple[int, int]:
    """(k, d): the common subspace size and the directions per task for a weight of rank
    ``rank`` (= min(m, n)), as the authors' code sizes them: ⌊f·r⌋ rounded so that the
    task-specific part splits evenly, k + N·d = r. k < 0 when N exceeds what r allows."""
    common = int(rank * fraction)
    per_task = round((rank - common) / n_tasks)
    return rank - per_task * n_tasks, per_task


@dataclass(frozen=True)
class IsoCTS(StateDictMerge):
    scaling_factor: float = 1.0  # α in θ0 + α Δ_iso (FusionBench's default); sweep on validation
    # f: share of the r = min(m, n) directions taken from the common subspace (paper, authors'
    # code and FusionBench: 0.8); the rest is split evenly between the tasks
    common_space_fraction: float = 0.8
    # 2-D keys averaged instead of decomposed (the authors' code excludes the text projection)
    average_keys: list[str] = field(default_factory=lambda: ["*text_projection*"])
    exclude_keys: list[str] = field(default_factory=list)  # fnmatch patterns kept at θ0

    def __post_init__(self):
        if not 0.0 <= self.common_space_fraction <= 1.0:
            raise FusionBenchError(
                f"method.common_space_fraction={self.common_space_fraction!r} must be in [0, 1]: "
                "the share of each weight's rank kept from the common subspace (default 0.8; 1.0 "
                "is Iso-C)."
            )

    def merge(self, pretrained: StateDict, experts: Experts, progress: Progress = None):
        names, n_tasks = list(experts), len(experts)
        require_experts(experts, "Iso-CTS")
        alpha = self.scaling_factor
        f64 = torch.float64

        def merge_key(key: str, base: Tensor) -> Tensor:
            if base.dim() != 2 or is_excluded(key, self.average_keys):
                return base + alpha * (task_vector_sum(experts, key, base) / n_tasks)
            rows, cols = base.shape
            rank = min(rows, cols)
            k, per_task = subspace_sizes(rank, n_tasks, self.common_space_fraction)
            if k < 0:
                raise FusionBenchError(
                    f"Iso-CTS gives each of the {n_tasks} experts {per_task} direction(s) of "
                    f"'{key}' ({rows}×{cols}, rank {rank}): {n_tasks * per_task} > {rank}. Raise "
                    "method.common_space_fraction, merge fewer experts, or add "
                    f"'{key}' to method.average_keys to average it instead."
                )
            total = task_vector_sum(experts, key, base, f64)
            if per_task == 0:  # the common subspace is everything: Iso-C
                orthogonal, singular_values = polar_factor(total)
                return (base + (alpha * singular_values.mean()) * orthogonal).float()

            u_all = torch.zeros(rows, rank, dtype=f64)
            s_all = torch.zeros(rank, dtype=f64)
            v_all = torch.zeros(rank, cols, dtype=f64)
            u_all[:, :k], s_all[:k], v_all[:k] = top_singular_triplets(total, k)
            del total
            common = u_all[:, :k]
            base64 = base.to(f64)

            def task_specific(t: int) -> None:  # task t's residual triplets, into its block
                tau = expert_tensor(experts[names[t]], key, base, names[t]).to(f64) - base64
                residual = tau - common @ (common.T @ tau)
                u, s, vh = top_singular_triplets(residual, per_task)
                # what is left of τ_t at rounding level (τ_t inside the common subspace) is no
                # direction: zero on τ_t's scale, as the kernel's tolerance is on its input's
                keep = s > float(tau.norm()) * max(rows, cols) * EPS64
                block = slice(k + t * per_task, k + (t + 1) * per_task)
                u_all[:, block], s_all[block], v_all[block] = u * keep, s * keep, vh * keep[:, None]

            parallel_map(task_specific, range(n_tasks))
            (u_orth, _), (v_orth, _) = parallel_map(polar_factor, [u_all, v_all])
            return (base + (alpha * s_all.mean()) * (u_orth @ v_orth)).float()

        return map_keys(pretrained, merge_key, self.exclude_keys, progress)
