"""OPCM: Orthogonal Projection-based Continual Merging (Tang et al., "Merging Models on the Fly
Without Retraining: A Sequential Approach to Scalable Continual Model Merging", 2025,
arXiv:2501.09522).

Experts arrive one at a time. The running (unnormalised) update starts at the first task vector,
S_1 = τ_1, and for every later expert t:

- every 2-D linear weight: with the thin SVD S_{t−1} = U diag(s) Vᵀ and the split rank r = the first
  index at which the cumulative share of the singular values Σ_{j≤i} s_j / Σ_j s_j exceeds ``alpha``
  (0 if none does; the share is clamped to its exact maximum 1, see :func:`split_rank`),
  the new task vector loses its components in the previous update's principal subspace — the block
  (Uᵀ τ_t V)_{ij}, i, j < r — and on every singular pair, (Uᵀ τ_t V)_{ii}:
  S_t = S_{t−1} + τ_t − U_r (U_rᵀ τ_t V_r) V_rᵀ − Σ_{i ≥ r} (u_iᵀ τ_t v_i) u_i v_iᵀ;
- every other parameter (biases, LayerNorms, embeddings, the patch convolution): S_t = S_{t−1} + τ_t;
- the merged model keeps the merged update's norm at the average task-vector norm:
  θ_t = θ0 + S_t · mean(‖τ_1‖ … ‖τ_t‖) / ‖S_t‖ (norms over the whole image tower).

This is the rule of FusionBench's ``OPCMForCLIP`` (the authors' code, fusion-bench 0.2.33), read
and re-stated here: its λ_t bookkeeping (merged = θ0 + (λ_{t−1}·Δ_{t−1} + cleaned τ_t)/λ_t with λ_t
= ‖·‖/avg) is the same as keeping the unnormalised S_t. Differences: the SVD is the float64 one of
:mod:`fusion_bench.spectral` (FusionBench: float32); singular pairs of numerically zero singular
values (σ ≤ σ_max·max(m, n)·ε₆₄, whose vectors any SVD picks arbitrarily) take no part in the
diagonal removal — FusionBench's full-matrix SVD removes the new vector's components on whatever
null-space basis LAPACK returns (identical for the full-rank updates of real fine-tuning);
"linear weight" means a 2-D key not matched by ``average_keys`` (FusionBench: ``nn.Linear``
modules; the 2-D position embedding is excluded by default for the same effect).

Run: ``fusion_bench method=continual/opcm`` (the sequential protocol: ``sequence.*``)
Memory: θ0 (lazy) + the running update S (1 image tower, float32) + the τ and float64 SVDs of a
window of 2·threads keys; the merged model is built when asked for. Independent of the number of
experts. Time: one float64 SVD per 2-D weight per expert after the first, spread over torch's
threads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import Context, SequentialMerge, key_progress
from fusion_bench.method.continual import RunningUpdate
from fusion_bench.spectral import svd, zero_tolerance
from fusion_bench.tensor_ops import StateDict, is_excluded


@dataclass(frozen=True)
class OPCM(SequentialMerge[RunningUpdate]):
    alpha: float = 0.5  # share of the singular values whose subspace is protected (FusionBench 0.5)
    # 2-D keys that are not linear weights: merged like the other parameters
    average_keys: list[str] = field(default_factory=lambda: ["*embedding*"])
    exclude_keys: list[str] = field(default_factory=list)  # fnmatch patterns kept at θ0

    def __post_init__(self):
        if not 0.0 < self.alpha <= 1.0:
            raise FusionBenchError(
                f"method.alpha={self.alpha} is not in (0, 1]: it is the share of the merged "
                "update's singular values whose subspace new experts must avoid (paper: 0.5)."
            )

    def start(self, pretrained: StateDict, context: Context | None = None) -> RunningUpdate:
        return RunningUpdate(pretrained)

    def absorb(self, state: RunningUpdate, name: str, expert: StateDict) -> RunningUpdate:
        def combine(key: str, tau: Tensor, previous: Tensor | None) -> Tensor:
            if previous is None:  # the first expert
                return tau
            if tau.dim() == 2 and not is_excluded(key, self.average_keys):
                return lambda: previous + self.project(previous, tau)  # SVDs run in parallel
            return previous + tau

        state.absorb(
            name, expert, self.exclude_keys, combine, key_progress(f"opcm: {name}"), norm=True
        )
        return state

    def merged(self, state: RunningUpdate) -> dict[str, Tensor]:
        norm = state.update_norm()
        scale = sum(state.norms) / len(state.norms) / norm if norm > 0 else 0.0
        return state.model(scale, self.exclude_keys)

    def project(self, previous: Tensor, tau: Tensor) -> Tensor:
        """τ without its components in ``previous``'s principal subspace and on its singular
        pairs (see the module docstring), float32."""
        u, s, vh = svd(previous)
        rank = int((s > zero_tolerance(s, previous.shape)).sum())  # defined singular pairs only
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
        r = split_rank(s, self.alpha)
        tau64 = tau.to(torch.float64)
        coefficients = u.T @ tau64 @ vh.T  # (rank, rank): u_iᵀ τ v_j over the thin bases
        removed = u[:, :r] @ coefficients[:r, :r] @ vh[:r]
        diagonal = coefficients.diagonal()[r:]
        removed += (u[:, r:] * diagonal) @ vh[r:]
        return (tau64 - removed).to(torch.float32)


def split_rank(s: Tensor, alpha: float) -> int:
    """The first index i with Σ_{j≤i} s_j / Σ_j s_j > alpha (0 if there is none, as FusionBench).

    The share is clamped to 1, its exact-arithmetic maximum: rounding can put the last cumulative
    shares an ulp above 1, which would make ``alpha = 1`` protect almost the whole spectrum or
    nothing depending on the SVD's last bits; in exact arithmetic no share exceeds 1, so r = 0."""
    total = s.sum()
    if total <= 0:
        return 0
    above = (s.cumsum(0) / total).clamp(max=1.0) > alpha
    return int(above.to(torch.int8).argmax()) if bool(above.any()) else 0
