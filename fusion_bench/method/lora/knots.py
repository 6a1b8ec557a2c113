"""KnOTS (Stoica, Ramesh, Ecsedi, Choshen, Hoffman, "Model merging with SVD to tie the KnOTS",
ICLR 2025, arXiv:2410.19735).

For every weight that T LoRA experts adapt, ΔW_t = B_t A_t (m×n):
1. align: the thin SVD of the column concatenation [ΔW_1 | … | ΔW_T] = U S [V_1 … V_T]
   (U: m×k shared by all tasks, V_t: k×n task t's block of the right singular vectors), keeping
   the k singular values above ``singular_value_threshold`` (the authors' 1e-5);
2. each task is represented by diag(S) V_t (ΔW_t = U · diag(S) V_t exactly);
3. the merge rule ``base`` (TIES by default, with the authors' λ 0.6, top-20 %, disjoint mean)
   runs on these representations of **all weights at once**, as the authors flatten every
   layer's representation into one vector per task (TIES's trim is global);
4. ΔW = U · merged, θ = θ0 + ΔW.

The SVD is computed from the factors (never forming the m × T·n concatenation): with
A_tᵀ = Q_t R_t (QR), [ΔW_1 … ΔW_T] = C · blockdiag(Q_tᵀ) for C = [B_1 R_1ᵀ … B_T R_Tᵀ] (m × Σ r_t),
so the SVD of C = U S Wᵀ gives U, S and V_t = W_tᵀ Q_tᵀ (W_t: task t's rows of W), in float64.

Checked against the authors' code (github.com/gstoica27/KnOTS, ``task_merger.py::SVDMerger``
and ``masking_ops.py``): same concatenation, threshold, representation diag(S)V_t, global TIES
with disjoint mean, reassembly; see docs/methods/lora/knots.md.

Run: ``fusion_bench modelpool=tiny8_lora method=lora/knots`` (KnOTS-TIES); another rule:
``method.base=task_arithmetic '~method.base_options.threshold' '~method.base_options.merge_func'``
(KnOTS-TA, which equals task arithmetic).
Memory: the merged model + U of every adapted weight and T representations k×n per weight
(k ≤ Σ r_t): about T times the adapters' A factors, never a full ΔW_t.
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


def knots_align(pairs: Sequence[LowRank | None], threshold: float):
    """(U m×k, [diag(S) V_t k×n]) of [ΔW_1 | … | ΔW_T]; a missing pair is a zero ΔW_t."""
    n = next(p.A.shape[1] for p in pairs if p is not None)
    blocks, qs = [], []
    for p in pairs:
        if p is None:
            continue
        Q, R = torch.linalg.qr(p.A.T)  # A_tᵀ = Q R: n×r, r×r
        blocks.append(p.B @ R.T)
        qs.append(Q)
    U, S, Wh = torch.linalg.svd(torch.cat(blocks, dim=1), full_matrices=False)
    keep = S > threshold
    U, S, Wh = U[:, keep], S[keep], Wh[keep]
    reps, start, i = [], 0, 0
    for p in pairs:
        if p is None:
            reps.append(torch.zeros(len(S), n, dtype=S.dtype))
            continue
        r = qs[i].shape[1]
        reps.append(S[:, None] * (Wh[:, start : start + r] @ qs[i].T))
        start, i = start + r, i + 1
    return U, reps


@dataclass(frozen=True)
class KnOTS(LoRAMerge):
    base: str = "ties_merging"  # the merge rule on the aligned representations (conf/method/)
    base_options: dict[str, Any] = field(default_factory=dict)  # over the base's YAML defaults
    singular_value_threshold: float = 1e-5  # singular values of the concatenation kept: S > this

    def __post_init__(self):
        if not self.singular_value_threshold >= 0:
            raise FusionBenchError(
                f"method.singular_value_threshold={self.singular_value_threshold!r}: give a "
                "threshold ≥ 0 on the singular values kept (the authors: 1e-5)."
            )
        self.base_method()

    def base_method(self) -> StateDictMerge:
        return base_merge(self.base, dict(self.base_options))

    def merge(self, pretrained: StateDict, adapters: Adapters, progress: Progress = None):
        require_experts(adapters, "KnOTS")
        names = list(adapters)
        keys = adapted_keys(pretrained, adapters)
        bases: dict[str, Tensor] = {}
        reps: dict[str, dict[str, Tensor]] = {n: {} for n in names}
        for key in progress(keys) if progress is not None else keys:
            U, key_reps = knots_align(factors(adapters, key), self.singular_value_threshold)
            bases[key] = U
            for name, rep in zip(names, key_reps, strict=True):
                reps[name][key] = rep.to(torch.float32)
        zeros = {key: torch.zeros_like(reps[names[0]][key]) for key in keys}
        merged = self.base_method().merge(zeros, reps)
        return with_updates(
            pretrained, keys, lambda key, base: bases[key] @ merged[key].to(torch.float64)
        )
