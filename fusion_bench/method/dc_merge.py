"""DC-Merge: directional-consistent merging (Zhang et al., "DC-Merge: Improving Model Merging with
Directional Consistency", CVPR 2026, arXiv:2603.06242), the full fine-tuning setting.

For every 2-D weight, with N experts, τ_i = θ_i − θ0 (m×n), r = min(m, n) and k = ⌊r / N⌋:

1. **truncate and smooth**: each τ_i keeps its top-k singular triplets (U_i, s_i, V_i); its
   singular values may be smoothed, keeping their sum: ``average`` gives every one the mean,
   ``linear`` spreads Σ s_i linearly from ρ' to 1 (ratio first/last ρ' = min(ρ, s_i1/s_ik)).
   ``none`` (the authors' full fine-tuning code) keeps s_i;
2. **shared orthogonal subspace**: U = [U_1 … U_N], V = [V_1 … V_N]; their orthogonal polar
   factors P_U = polar(U), P_V = polar(V) (the closest matrices with orthonormal columns);
3. **project**: M_i = P_Uᵀ U_i diag(s̃_i) V_iᵀ P_V, an (N·k)×(N·k) matrix per task;
4. **aggregate there**: each M_i keeps its top ``keep_fraction`` of entries by magnitude (counted
   over the r×r matrix of the reference, ties with the threshold kept); per entry, the sign of
   Σ_i M_i is elected and the agreeing entries averaged (0 where the sum is 0), as TIES's
   disjoint mean; only the N diagonal k×k blocks (block i: task i's own directions) are kept;
5. **project back**: Δ = P_U · blockdiag(agg) · P_Vᵀ.

Tensors that are not 2-D and the 2-D keys matched by ``average_keys`` (the reference excludes
``text_projection``) get the mean of the task vectors. θ = θ0 + α Δ; the authors select α on
validation data from {0.1, 0.2, …, 3.0}.

Checked against the authors' code (github.com/Tobeginwith/DC-Merge,
``vision_fft_merge/src/utils/DC_utils.py``: ``dc_merge``, and ``vision_lora_merge/
merging_functions.py`` for the smoothing rules); see docs/methods/dc_merge.md. Where the stacked
U (or V) is rank-deficient (e.g. identical experts), the reference's SVD completes the polar factor
with arbitrary vectors; here (:func:`fusion_bench.spectral.polar_factor`) those directions get
nothing, which defines the result. The LoRA setting of the paper waits for LoRA model pools.

Run: ``fusion_bench method=dc_merge method.scaling_factor=1.0``
Memory: key by key, expert by expert; for the current key the stacked U (m×N·k ≤ m×r), V, their
polar factors and one (N·k)² aggregation state (float64), and one τ per worker thread: a few copies
of the largest matrix, independent of N. Time: N truncated decompositions + 2 polar factors per
2-D tensor (float64, :mod:`fusion_bench.spectral`), the N decompositions spread over torch's
threads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import Experts, Progress, StateDictMerge, require_experts
from fusion_bench.method.ties_merging import DisjointMerge
from fusion_bench.spectral import polar_factor, top_singular_triplets
from fusion_bench.tensor_ops import (
    StateDict,
    expert_tensor,
    is_excluded,
    map_keys,
    parallel_map,
    task_vector_sum,
)

SMOOTHINGS = ("none", "average", "linear")


@dataclass(frozen=True)
class DCMerge(StateDictMerge):
    scaling_factor: float = 1.0  # α in θ0 + α Δ; the authors select it on validation (0.1 … 3.0)
    smoothing: str = "none"  # none (authors' full-FT code) | average | linear (their LoRA code)
    rho: float = 5.0  # linear smoothing: at most this ratio of the first to the last s̃ (≥ 1)
    keep_fraction: float = 1e-3  # entries of each projected M_i kept (of r×r; authors: 1e-3)
    # 2-D keys averaged instead (the reference excludes the text projection)
    average_keys: list[str] = field(default_factory=lambda: ["*text_projection*"])
    exclude_keys: list[str] = field(default_factory=list)  # fnmatch patterns kept at θ0

    def __post_init__(self):
        if self.smoothing not in SMOOTHINGS:
            raise FusionBenchError(
                f"method.smoothing={self.smoothing!r} is not one of {list(SMOOTHINGS)}: 'none' "
                "(the authors' full fine-tuning code), 'average' or 'linear' (their LoRA code)."
            )
        if not self.rho >= 1.0:
            raise FusionBenchError(
                f"method.rho={self.rho} is below 1: it is the largest ratio of the first to the "
                "last smoothed singular value (1 = average, the authors' default 5.0)."
            )
        if not 0.0 < self.keep_fraction <= 1.0:
            raise FusionBenchError(
                f"method.keep_fraction={self.keep_fraction} is not in (0, 1]: it is the fraction "
                "of each projected task matrix's entries kept (the authors use 1e-3; 1 keeps all)."
            )

    def merge(self, pretrained: StateDict, experts: Experts, progress: Progress = None):
        names, n_tasks = list(experts), len(experts)
        require_experts(experts, "DC-Merge")
        alpha = self.scaling_factor

        def merge_key(key: str, base: Tensor) -> Tensor:
            if base.dim() != 2 or is_excluded(key, self.average_keys):
                return base + alpha * (task_vector_sum(experts, key, base) / n_tasks)
            m, n = base.shape
            k = min(m, n) // n_tasks
            if k == 0:
                raise FusionBenchError(
                    f"DC-Merge keeps ⌊rank / experts⌋ = ⌊{min(m, n)} / {n_tasks}⌋ = 0 singular "
                    f"vectors per task for '{key}' ({m}×{n}): merge fewer experts, or add "
                    f"'{key}' to method.average_keys to average it instead."
                )

            def truncate(name: str) -> tuple[Tensor, Tensor, Tensor]:
                f64 = torch.float64
                tau = expert_tensor(experts[name], key, base, name).to(f64) - base.to(f64)
                u, s, vh = top_singular_triplets(tau, k)
                return u, smooth(s, self.smoothing, self.rho), vh

            factors = parallel_map(truncate, names)
            u_all = torch.cat([u for u, _, _ in factors], dim=1)  # m × N·k
            s_all = torch.cat([s for _, s, _ in factors])
            v_all = torch.cat([vh for _, _, vh in factors], dim=0)  # N·k × n
            del factors
            delta = directional_merge(u_all, s_all, v_all, n_tasks, self.keep_fraction)
            return base + alpha * delta.float()

        return map_keys(pretrained, merge_key, self.exclude_keys, progress)


# -- DC-Merge's algebra ---------------------------------------------------------------------------
def smooth(s: Tensor, smoothing: str, rho: float) -> Tensor:
    """The smoothed top-k singular values s̃ of one task (their sum kept): ``average`` flat,
    ``linear`` from ρ' to 1 with ρ' = min(ρ, s_1/s_k) (ρ where s_k = 0), ``none`` unchanged."""
    if smoothing == "none" or s.numel() == 0:
        return s
    k = s.numel()
    if smoothing == "average":
        shape = torch.ones_like(s)
    else:
        ratio = min(rho, float(s[0] / s[-1])) if s[-1] > 0 else rho
        shape = torch.linspace(ratio, 1.0, k, dtype=s.dtype)
    return s.sum() * (shape / shape.sum())


def keep_top_entries(matrix: Tensor, keep: int) -> Tensor:
    """``matrix`` with the entries below its ``keep``-th largest magnitude zeroed (ties kept).
    Fewer than ``keep`` entries (the rest of the reference's r×r matrix is zeros): all kept."""
    flat = matrix.abs().reshape(-1)
    if keep >= flat.numel():
        return matrix
    threshold = torch.kthvalue(flat, flat.numel() - keep + 1).values
    return matrix * (matrix.abs() >= threshold)


def directional_merge(
    u_all: Tensor, s_all: Tensor, v_all: Tensor, n_tasks: int, keep_fraction: float
) -> Tensor:
    """Δ from the N tasks' (smoothed) truncated triplets, stacked: ``u_all`` (m × N·k),
    ``s_all`` (N·k), ``v_all`` (N·k × n), float64 (steps 2–5 of the module docstring)."""
    m, n = u_all.shape[0], v_all.shape[1]
    width = u_all.shape[1]
    k = width // n_tasks
    r = min(m, n)
    (p_u, _), (p_v, _) = parallel_map(polar_factor, [u_all, v_all])  # m × N·k, N·k × n
    left = p_u.T @ u_all  # block column i: P_Uᵀ U_i
    right = v_all @ p_v.T  # block row i: V_iᵀ P_V
    keep = max(1, int(keep_fraction * r * r))  # the reference counts the r×r padded matrix
    merger = DisjointMerge(torch.zeros(width, width, dtype=torch.float64), "mean")
    for i in range(n_tasks):
        b = slice(i * k, (i + 1) * k)
        merger.add(keep_top_entries((left[:, b] * s_all[b]) @ right[b], keep))
    signs = merger.signs()
    aggregated = merger.result(signs) * signs.abs()  # disjoint mean; 0 where Σ_i M_i = 0
    delta = torch.zeros(m, n, dtype=torch.float64)
    for i in range(n_tasks):  # only the diagonal blocks: P_U blockdiag(agg) P_V
        b = slice(i * k, (i + 1) * k)
        delta += p_u[:, b] @ aggregated[b, b] @ p_v[b]
    return delta
