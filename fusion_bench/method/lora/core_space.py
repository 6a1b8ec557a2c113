"""Core Space merging (Panariello, Marczak et al., "Accurate and Efficient Low-Rank Model Merging
in Core Space", NeurIPS 2025, arXiv:2509.17786).

For every weight that T LoRA experts adapt, ΔW_t = B_t A_t (B_t: m×r_t, A_t: r_t×n):
1. reference bases from the stacked factors (float64 thin SVDs, every direction kept, R = Σ r_t):
   U = left singular vectors of [B_1 … B_T] (m×R'), V = right singular vectors of
   [A_1; …; A_T] (R''×n), R' = min(m, R), R'' = min(n, R);
2. each task's **core matrix** M_t = Uᵀ B_t A_t Vᵀ = (Uᵀ B_t)(A_t Vᵀ) (R'×R''), computed from the
   factors without forming ΔW_t. The projection is lossless: U M_t V = B_t A_t, because the
   columns of every B_t lie in span(U) and the rows of every A_t in span(V);
3. the merge rule ``base`` (any data-free merge of ``conf/method/``: task arithmetic, TIES, TSV-M,
   Iso-C, DARE, CART ...) runs on the T core matrices as if they were the task matrices
   (pretrained = 0). ``scope: weight`` (default): one weight at a time, as the authors'
   ``MatrixPerLayerMerger`` does (TIES trims each weight's cores); ``scope: model``: one call over
   every adapted weight's cores (TIES trims over the whole model; LiNeS, which scales by depth,
   and CART/WUDI's q/k/v grouping need it);
4. ΔW = U M V, θ = θ0 + ΔW (the base's scaling factor is the paper's λ).

Linear rules give exactly their full-space result (Core Space + task arithmetic = task
arithmetic on the expanded experts); rules that look at entries (TIES, DARE) or spectra (TSV-M,
Iso-C) see R'×R'' cores instead of m×n matrices, which is the paper's point: with R ≪ m, n the
rule is cheaper and (the paper reports) more accurate. Iso-C equalises the R core singular values,
not the min(m, n) ones of ΔW (most of which are zero for a LoRA sum).

Checked against the authors' code (github.com/apanariello4/core-space-merging,
``task_merger.py::MatrixPerLayerMerger.get_core_matrices``): same bases (SVD, not QR; no
truncation), same core matrices, same reconstruction; see docs/methods/lora/core_space.md.

Run: ``fusion_bench modelpool=tiny8_lora method=lora/core_space`` (base: task arithmetic) or
``method=lora/core_space_ties`` / ``core_space_tsv_m`` / ``core_space_iso_c``.
Memory: the merged model + one weight's factors, bases and T cores (R×R each): never a full ΔW_t
(``scope: model``: + every weight's U, V and T cores, ~T·R² + R·(m + n) numbers per weight).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fusion_bench.errors import FusionBenchError
from fusion_bench.lora import LowRank
from fusion_bench.method.base import (
    Adapters,
    LoRAMerge,
    Progress,
    StateDictMerge,
    base_merge,
    require_experts,
)
from fusion_bench.method.lora import adapted_keys, factors, with_updates
from fusion_bench.tensor_ops import StateDict


def core_space(pairs: Sequence[LowRank | None]):
    """(U m×R', V R''×n, [M_t R'×R'']) for one weight; a missing pair has a zero core."""
    present = [p for p in pairs if p is not None]
    B = torch.cat([p.B for p in present], dim=1)
    A = torch.cat([p.A for p in present], dim=0)
    U = torch.linalg.svd(B, full_matrices=False).U
    V = torch.linalg.svd(A, full_matrices=False).Vh
    cores = [
        torch.zeros(U.shape[1], V.shape[0], dtype=U.dtype)
        if p is None
        else (U.T @ p.B) @ (p.A @ V.T)
        for p in pairs
    ]
    return U, V, cores


@dataclass(frozen=True)
class CoreSpace(LoRAMerge):
    base: str = "task_arithmetic"  # the merge rule run on the core matrices (a conf/method/ name)
    base_options: dict[str, Any] = field(default_factory=dict)  # over the base's YAML defaults
    scope: str = "weight"  # weight: the rule per weight (the authors'); model: over all at once

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise FusionBenchError(
                f"method.scope={self.scope!r}: choose 'weight' (the rule on each weight's cores, "
                "as the authors) or 'model' (one call over every weight's cores)."
            )
        rule = (
            self.base_method()
        )  # the base's name and options are checked before anything is loaded
        if self.scope == "weight" and getattr(rule, "whole_model", False):
            raise FusionBenchError(
                f"method.base={self.base!r} scales each weight by its place in the whole model, "
                "which a per-weight rule cannot see. Use method.scope=model."
            )
        if self.scope == "weight" and getattr(rule, "group_qkv", False):
            raise FusionBenchError(
                f"method.base={self.base!r} with group_qkv=true treats a layer's q/k/v weights "
                "as one, which a per-weight rule cannot do. Use method.scope=model, or "
                "++method.base_options.group_qkv=false (each weight's cores on their own, as the "
                "Core Space authors run CART)."
            )

    def base_method(self) -> StateDictMerge:
        return base_merge(self.base, dict(self.base_options))

    def merge(self, pretrained: StateDict, adapters: Adapters, progress: Progress = None):
        require_experts(adapters, "Core Space")
        rule = self.base_method()
        names = list(adapters)
        keys = adapted_keys(pretrained, adapters)

        def project(key: str):
            U, V, cores = core_space(factors(adapters, key))
            return U, V, {n: c.to(torch.float32) for n, c in zip(names, cores, strict=True)}

        def merged_cores(projected: dict) -> dict[str, Tensor]:
            zeros = {
                key: torch.zeros_like(next(iter(p[2].values()))) for key, p in projected.items()
            }
            experts = {n: {key: p[2][n] for key, p in projected.items()} for n in names}
            return rule.merge(zeros, experts)

        if self.scope == "model":
            projected = {key: project(key) for key in (progress(keys) if progress else keys)}
            merged = merged_cores(projected)
            return with_updates(
                pretrained,
                keys,
                lambda key, base: (
                    projected[key][0] @ merged[key].to(torch.float64) @ projected[key][1]
                ),
            )

        def update(key: str, base: Tensor) -> Tensor:
            U, V, cores = project(key)
            merged = merged_cores({key: (U, V, cores)})[key]
            return U @ merged.to(torch.float64) @ V

        return with_updates(pretrained, keys, update, progress)


SCOPES = ("weight", "model")
