"""Consensus merging (Wang et al., "Localizing Task Information for Improved Model Merging and
Compression", ICML 2024), on top of a base merge (task arithmetic or TIES).

1. The base merge's multi-task vector τ_MTL, at unit scale: θ_MTL = θ0 + τ_MTL is ``base`` run with
   its ``scaling_factor`` set to 1 (task arithmetic: τ_MTL = Σ_t τ_t; TIES: the disjoint-sum
   vector).
2. One TALL mask per task: m_t = 1{|θ0 − θ_t| > λ_t · |θ_MTL − θ_t|}, i.e. |τ_t| > λ_t |τ_MTL − τ_t|
   (strict, as the authors' ``generate_task_masks``).
3. The consensus mask keeps the entries that at least k tasks mark: m = 1{Σ_t m_t ≥ k}
   (k = 2 removes "selfish" and "catastrophic" weights, k = 1 only the catastrophic ones,
   k = 0 nothing, k > N everything).
4. θ = θ0 + α · (m ⊙ τ_MTL): the mask filters the merged vector, then α scales it.

This is the order of the authors' code (``src/eval/aggregation.py``, method ``consensus``): the
base merge is done on the unmasked task vectors and the consensus mask is applied to its result.
The mask is the same for every task, so for task arithmetic this equals merging the masked task
vectors m ⊙ τ_t; for TIES it does not (masking first would change TIES' global top-k and its sign
election), and the authors' order is kept.

Streaming: the base merge runs first (its own memory, about one image tower for task arithmetic
and TIES); then, key by key, the N task vectors of that key are read one at a time to count the
TALL-mask votes, and the base's output tensor of that key is replaced by the masked result. Memory:
the output + O(1) tensors of one key, independent of N; one more read of every expert than the
base.

Run: ``fusion_bench method=consensus`` (consensus task arithmetic),
``fusion_bench method=consensus method.base=ties_merging`` (consensus TIES).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import Experts, Progress, StateDictMerge, base_merge, per_expert
from fusion_bench.tensor_ops import Scratch, StateDict, expert_tensor, map_keys

# Options consensus sets on its base itself (the base runs at unit scale, on consensus's keys).
OWN_OPTIONS = ("scaling_factor", "exclude_keys")


@dataclass(frozen=True)
class Consensus(StateDictMerge):
    base: str = "task_arithmetic"  # the merge whose multi-task vector is masked (data-free)
    base_options: dict[str, Any] = field(default_factory=dict)  # e.g. {threshold: 20} for TIES
    scaling_factor: float = 0.3  # α on the masked vector; the authors choose it on validation
    tall_mask_lambda: float | list[float] = 0.4  # λ_t, one or one per task (authors: 0.2–0.6)
    k: int = 2  # keep the entries at least k TALL masks mark (the authors' prun_thre_k)
    exclude_keys: list[str] = field(default_factory=list)  # fnmatch patterns kept at θ0

    def __post_init__(self):
        if self.k < 0:
            raise FusionBenchError(
                f"method.k={self.k}: k is the number of TALL masks that must mark an entry for it "
                "to be kept; give an integer ≥ 0 (the authors' default is 2)."
            )
        lambdas = (
            self.tall_mask_lambda
            if isinstance(self.tall_mask_lambda, list)
            else [self.tall_mask_lambda]
        )
        if any(lam < 0 for lam in lambdas):
            raise FusionBenchError(
                f"method.tall_mask_lambda={self.tall_mask_lambda!r}: λ_t scales |τ_MTL − τ_t| in "
                "the TALL mask |τ_t| > λ_t |τ_MTL − τ_t| and must be ≥ 0 (the authors use 0.2–0.6)."
            )
        clash = sorted(set(self.base_options) & set(OWN_OPTIONS))
        if clash:
            raise FusionBenchError(
                f"method.base_options sets {clash}: consensus runs its base at unit scale on its "
                "own keys, as the authors do; set method.scaling_factor (α, applied after the "
                "mask) and method.exclude_keys instead."
            )
        self.base_method()  # the base's own checks, before anything is loaded

    def base_method(self) -> StateDictMerge:
        """The base merge at unit scale, on consensus's keys: its output is θ0 + τ_MTL."""
        return unit_scale_base(self.base, self.base_options, self.exclude_keys)

    def models_held(self, n_experts: int) -> float:
        return self.base_method().models_held(n_experts)

    def merge(self, pretrained: StateDict, experts: Experts, progress: Progress = None):
        lambdas = per_expert(self.tall_mask_lambda, list(experts), "tall_mask_lambda")
        multi_task = dict(self.base_method().merge(pretrained, experts, progress))
        scratch = Scratch()

        def merge_key(key: str, base: Tensor) -> Tensor:
            theta_mtl = multi_task.pop(key).to(torch.float32)  # θ0 + τ_MTL; freed as we go
            votes = consensus_votes(base, theta_mtl, experts, key, lambdas, scratch)
            delta = theta_mtl - base  # τ_MTL (a new tensor: the base may return shared ones)
            return delta.mul_(votes >= self.k).mul_(self.scaling_factor).add_(base)

        return map_keys(pretrained, merge_key, self.exclude_keys, progress)


def consensus_votes(
    base: Tensor,
    theta_mtl: Tensor,
    experts: Mapping[str, StateDict],
    key: str,
    lambdas: list[float],
    scratch: Scratch | None = None,
) -> Tensor:
    """Per entry of ``key``, how many tasks' TALL masks mark it: |θ0 − θ_t| > λ_t · |θ_MTL − θ_t|,
    the authors' form, computed from the weights as they do (strict inequality). Experts are read
    one at a time, into reused buffers."""
    scratch = scratch or Scratch()
    votes = torch.zeros(base.shape, dtype=torch.int32)
    for (name, expert), lam in zip(experts.items(), lambdas, strict=True):
        votes += tall_mask(base, theta_mtl, expert_tensor(expert, key, base, name), lam, scratch)
    return votes


def tall_mask(
    base: Tensor, theta_mtl: Tensor, theta: Tensor, lam: float, scratch: Scratch | None = None
) -> Tensor:
    """One task's TALL mask of one key, 1{|θ0 − θ_t| > λ_t · |θ_MTL − θ_t|} (the authors' form,
    strict), as a bool tensor in ``scratch``'s buffer: read it before the next call."""
    scratch = scratch or Scratch()
    numel, shape = base.numel(), base.shape
    own = scratch("own", numel, torch.float32).view(shape)  # |θ0 − θ_t|
    rest = scratch("rest", numel, torch.float32).view(shape)  # λ_t |θ_MTL − θ_t|
    marked = scratch("marked", numel, torch.bool).view(shape)
    torch.sub(base, theta, out=own).abs_()
    torch.sub(theta_mtl, theta, out=rest).abs_().mul_(lam)
    return torch.gt(own, rest, out=marked)


def unit_scale_base(
    base: str, options: Mapping[str, Any], exclude_keys: list[str], option: str = "base"
) -> StateDictMerge:
    """The data-free merge ``base`` (with ``options`` over its YAML defaults) at unit scale, on
    the keys ``exclude_keys`` leaves: its output is θ0 + τ_MTL, the TALL masks' multi-task model
    (a base without ``scaling_factor``, e.g. ``simple_average``, is used as it is)."""
    method = base_merge(base, options, option)
    names = {f.name for f in dataclasses.fields(method)}
    own = {"scaling_factor": 1.0, "exclude_keys": list(exclude_keys)}
    return dataclasses.replace(method, **{k: v for k, v in own.items() if k in names})
