"""SVC: singular value calibration after a data-free merge (Li et al., "When Shared Knowledge
Hurts: Spectral Over-Accumulation in Model Merging", ICML 2026, arXiv:2602.05536).

A base merge (``base``: any data-free merge in ``conf/method/``, with ``base_options``) gives
θ_merge. Then, for every 2-D weight, with τ_i = θ_i − θ0 (K experts) and the merged task matrix
ΔM = θ_merge − θ0 = U diag(σ) Vᵀ (thin SVD, r = min(m, n)):

- subspace responses (paper Eq. 4): a_r^M = u_rᵀ ΔM = σ_r v_rᵀ and a_r^i = u_rᵀ τ_i;
- projection coefficients (Eq. 8): s_r^i = ⟨a_r^M, a_r^i⟩ / ‖a_r^i‖²  (how many times the merge
  counts task i's response along u_r; > 1: over-counted);
- calibration factor: γ_r = K / Σ_i max(α, s_r^i)  (α: ``alpha``, the floor on each s_r^i);
- θ = θ0 + U diag(γ σ) Vᵀ: only the singular values change.

As FusionBench 0.2.33 (``fusion_bench.method.singular_value_calibration``) and the authors' code
(github.com/lyymuwu/SVC, ``coef_cal_multi_ranks``: σ_r / mean_i max(s_r^i, α)): the column-space
(u_r) responses, ‖a_r^i‖² floored at 1e-12, every 2-D floating tensor calibrated (FusionBench:
every 2-D parameter; ``uncalibrated_keys`` leaves some as the base merged them — the authors'
script skips ``*embedding*`` keys). Tensors that are not 2-D are the base's. Directions whose σ_r
is numerically zero (σ_r ≤ σ_1·max(m, n)·ε₆₄, :func:`fusion_bench.spectral.zero_tolerance`) keep
what the base gave: there u_r is arbitrary and γ_r σ_r ≈ 0 either way. Computed as
θ_merge + U diag((γ − 1) σ) Vᵀ, so a factor γ_r = 1 returns the base's tensor bit for bit.

Run: ``fusion_bench method=svc`` (task arithmetic λ = 0.3, α = 0.1) or ``method=svc_tsv_m``
(TSV-M, α = 1.0); any data-free base, its options added with a ``+`` (the YAML's dict is empty):
``fusion_bench method=svc method.base=ties_merging +method.base_options.threshold=20``.

Memory: the base merge runs first and streams as it does (task arithmetic: the output + one
running sum); then its output is calibrated in place, key by key, and within a key expert by
expert: held are the merged model (the output) + per worker thread the float64 U, σ, Vᵀ of one key
and one τ_i with its responses Uᵀτ_i — never the K task matrices of a key, never K models.
Time: one float64 SVD per 2-D tensor (the spectral kernel) + K products Uᵀτ_i (2·m·n·r flops
each), spread over torch's threads key by key (:func:`fusion_bench.tensor_ops.parallel_map`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import Experts, Progress, StateDictMerge, base_merge, require_experts
from fusion_bench.spectral import top_singular_triplets
from fusion_bench.tensor_ops import StateDict, expert_tensor, is_excluded, parallel_map

RESPONSE_FLOOR = 1e-12  # ‖a_r^i‖² is floored here (FusionBench's clamp), as is a zero response


@dataclass(frozen=True)
class SingularValueCalibration(StateDictMerge):
    base: str = "task_arithmetic"  # the data-free merge calibrated (a conf/method/ name)
    base_options: dict[str, Any] = field(default_factory=dict)  # over the base's YAML defaults
    alpha: float = 0.1  # α, floor on s_r^i (FusionBench's task-arithmetic preset; TSV-M: 1.0)
    # fnmatch patterns of 2-D keys left as the base merged them (the authors skip "*embedding*")
    uncalibrated_keys: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.alpha > 0.0:
            raise FusionBenchError(
                f"method.alpha={self.alpha!r}: α floors every projection coefficient, and the "
                "calibration factor K / Σ max(α, s) is defined only for α > 0 (with α ≤ 0 it can "
                "divide by zero or flip signs). Give α > 0: FusionBench uses 0.1 after task "
                "arithmetic and 1.0 after TSV-M; the authors 1/K and 1.0."
            )
        self.base_method()  # the base's name and options are checked before anything is loaded

    def base_method(self) -> StateDictMerge:
        return base_merge(self.base, dict(self.base_options))

    def models_held(self, n_experts: int) -> float:
        return max(1.0, self.base_method().models_held(n_experts))

    def merge(self, pretrained: StateDict, experts: Experts, progress: Progress = None):
        require_experts(experts, "SVC")
        out = dict(self.base_method().merge(pretrained, experts, progress))
        keys = [
            key
            for key in pretrained
            if out[key].is_floating_point()
            and out[key].dim() == 2
            and not is_excluded(key, self.uncalibrated_keys)
        ]

        def calibrate(key: str) -> None:  # replaces out[key]: the output is the only model held
            base = pretrained[key].to(torch.float32)
            out[key] = calibrated(out[key], base, experts, key, self.alpha)

        window = max(1, torch.get_num_threads())  # keys calibrated together, one per thread
        batch: list[str] = []
        for key in progress(keys) if progress is not None else keys:
            batch.append(key)
            if len(batch) == window:
                parallel_map(calibrate, batch)
                batch = []
        parallel_map(calibrate, batch)
        return out


def calibrated(merged: Tensor, base: Tensor, experts: Experts, key: str, alpha: float) -> Tensor:
    """One 2-D tensor: θ_merge + U diag((γ − 1) σ) Vᵀ in float64, returned as float32
    (``base`` = θ0[key] in float32; the experts are read one at a time)."""
    f64 = torch.float64
    base64 = base.to(f64)
    merged64 = merged.to(f64)
    delta = merged64 - base64
    if not delta.any():  # the base left this key at θ0: nothing to calibrate
        return merged.to(torch.float32)
    u, sigma, vh = top_singular_triplets(delta, min(delta.shape))  # exact float64 SVD
    keep = sigma > 0  # numerically zero directions come back as zero triplets: left as they are
    u, sigma, vh = u[:, keep], sigma[keep], vh[keep]
    merged_response = sigma[:, None] * vh  # a_r^M = u_rᵀ ΔM = σ_r v_rᵀ, one row per r
    total = torch.zeros_like(sigma)  # Σ_i max(α, s_r^i)
    for name, expert in experts.items():
        tau = expert_tensor(expert, key, base, name).to(f64) - base64
        response = u.T @ tau  # a_r^i = u_rᵀ τ_i, one row per r
        overlap = (merged_response * response).sum(dim=1)
        energy = (response * response).sum(dim=1).clamp_min(RESPONSE_FLOOR)
        total += (overlap / energy).clamp_min(alpha)
        del tau, response
    gamma = len(experts) / total
    return (merged64 + (u * ((gamma - 1.0) * sigma)) @ vh).to(torch.float32)
