"""EMR-Merging (Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging",
NeurIPS 2024): one unified task vector plus, per task, a binary mask and a scalar rescaler; the
task id picks the task's mask and rescaler at inference.

With τ_t = θ_t − θ0 for every floating-point tensor of the image tower (weights, biases, layer
norms, embeddings; the authors' code takes every non-integer state-dict entry):

1. **Elect**: γ = sgn(Σ_t τ_t), an exact zero counted as −1 (the authors' ``(mean > 0)·2 − 1``);
   ε = max |τ_t| over the tasks whose sign agrees with γ (γ·τ_t > 0; 0 where none does);
   τ_uni = γ ⊙ ε.
2. **Mask**: M_t = 1{τ_t ⊙ τ_uni > 0}.
3. **Rescale**: λ_t = Σ_n mean|τ_t[n]| / Σ_n mean|M_t[n] ⊙ τ_uni[n]|, summed over the tensors n
   of the model (the authors' ViT and language-model code: a sum of per-tensor means, so each
   tensor weighs the same whatever its size; the paper's Eq. writes the ratio of whole-model L1
   sums, which only their 30-ViT script, on one flattened vector, computes). A task whose vector
   is zero, or has no entry agreeing with γ, gets λ_t = 0 (its model is θ0).
4. **Per-task model**: θ̂_t = θ0 + λ_t · M_t ⊙ τ_uni. No hyper-parameter, no data.

Run: ``fusion_bench method=routed/emr_merging`` (oracle task id: each task on its own θ̂_t).
Memory: one pass over the experts, key by key and expert by expert (a float64 sum, the running
max and min, and the N int8 signs of one key), keeps τ_uni (one image tower) and 2N scalars;
each task's model is built when the evaluator asks for it, re-reading that expert once to form
its mask. Held besides the evaluated model: ~1 image tower, independent of N.
Stored to serve all tasks: θ0 + τ_uni + N 1-bit masks + N scalars = 2 + N/32 image towers.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fusion_bench.method.base import (
    PerTaskMethod,
    Progress,
    key_progress,
    pool_experts,
    require_experts,
)
from fusion_bench.method.routed import TaskModels
from fusion_bench.tensor_ops import Scratch, StateDict, expert_tensor, map_keys, mergeable_keys


@dataclass(frozen=True)
class EMRMerging(PerTaskMethod):
    exclude_keys: list[str] = field(default_factory=list)  # fnmatch patterns kept at θ0

    def models(self, pool: Any) -> EMRModels:
        experts = pool_experts(pool)
        require_experts(experts, "EMR-Merging")
        pretrained = pool.pretrained()
        unified, rescalers = elect(pretrained, experts, self.exclude_keys, key_progress("emr"))
        return EMRModels(pretrained, experts, unified, rescalers, self.exclude_keys)

    def models_held(self, n_experts: int) -> float:
        return 1.0  # τ_uni (the masks are re-formed from each expert when its task is evaluated)

    def stored_models(self, n_experts: int) -> float:
        return 2.0 + n_experts / 32  # θ0 + τ_uni + N 1-bit masks (+ N scalars)


def elect(
    pretrained: StateDict,
    experts: Mapping[str, StateDict],
    exclude_keys: Sequence[str] = (),
    progress: Progress = None,
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """(τ_uni for every merged key, {expert: λ_t}) in one read of every expert, key by key."""
    names = list(experts)
    n = len(names)
    progress = progress or (lambda keys: keys)
    own = torch.zeros(n, dtype=torch.float64)  # Σ_n mean|τ_t[n]|
    kept = torch.zeros(n, dtype=torch.float64)  # Σ_n mean|M_t[n] ⊙ τ_uni[n]|
    scratch = Scratch()

    def elect_key(key: str, base: Tensor) -> Tensor:
        numel, shape = base.numel(), base.shape
        tau = scratch("tau", numel, torch.float32).view(shape)
        signs = scratch("signs", n * numel, torch.int8).view(n, *shape)
        total = torch.zeros(shape, dtype=torch.float64)  # Σ τ_t (its sign is γ)
        high = torch.zeros(shape)  # max(0, max_t τ_t): ε where γ = +1
        low = torch.zeros(shape)  # min(0, min_t τ_t): −ε where γ = −1
        for t, name in enumerate(names):
            torch.sub(expert_tensor(experts[name], key, base, name), base, out=tau)
            total += tau
            torch.maximum(high, tau, out=high)
            torch.minimum(low, tau, out=low)
            own[t] += tau.abs().sum(dtype=torch.float64) / numel
            signs[t].copy_(torch.sign(tau))  # −1, 0, 1
        unified = torch.where(total > 0, high, low)  # γ ⊙ ε, an exact-zero sum counts as γ = −1
        magnitude = unified.abs()
        direction = torch.sign(unified).to(torch.int8)
        for t in range(n):
            mask = signs[t] * direction > 0  # M_t = 1{τ_t ⊙ τ_uni > 0}
            kept[t] += (magnitude * mask).sum(dtype=torch.float64) / numel
        return unified

    keys: Iterable[str] = list(mergeable_keys(pretrained, exclude_keys))
    unified = {key: elect_key(key, pretrained[key].to(torch.float32)) for key in progress(keys)}
    rescalers: dict[str, float] = {}
    for t, name in enumerate(names):
        if kept[t] > 0:
            rescalers[name] = float(own[t] / kept[t])
            continue
        rescalers[name] = 0.0
        if own[t] > 0:
            warnings.warn(
                f"EMR-Merging: expert '{name}' agrees with the elected sign nowhere, so its mask "
                "keeps nothing of τ_uni and its model is θ0.",
                stacklevel=2,
            )
    return unified, rescalers


class EMRModels(TaskModels):
    """task -> θ̂_t = θ0 + λ_t · M_t ⊙ τ_uni, built when asked for (reading expert t once to form
    M_t = 1{τ_t ⊙ τ_uni > 0}). ``unified`` (τ_uni) and ``rescalers`` (λ_t) are what EMR stores."""

    def __init__(
        self,
        pretrained: StateDict,
        experts: Mapping[str, StateDict],
        unified: dict[str, Tensor],
        rescalers: dict[str, float],
        exclude_keys: Sequence[str] = (),
    ):
        self.pretrained, self.experts = pretrained, experts
        self.unified, self.rescalers = unified, rescalers
        self.exclude_keys = list(exclude_keys)

    def mask(self, task: str, key: str, base: Tensor | None = None) -> Tensor:
        """M_t of ``key`` (bool): where τ_t and τ_uni have the same (non-zero) sign."""
        base = self.pretrained[key].to(torch.float32) if base is None else base
        tau = torch.sub(expert_tensor(self.experts[task], key, base, task), base)
        return tau.mul_(self.unified[key]) > 0

    def build(self, task: str) -> dict[str, Tensor]:
        lam = self.rescalers[task]

        def build_key(key: str, base: Tensor) -> Tensor:
            unified = self.unified[key]
            kept = torch.where(self.mask(task, key, base), unified, torch.zeros_like(unified))
            return kept.mul_(lam).add_(base)

        return map_keys(self.pretrained, build_key, self.exclude_keys)
