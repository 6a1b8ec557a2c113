"""TALL masks (Wang, Dimitriadis et al., "Localizing Task Information for Improved Model Merging
and Compression", ICML 2024): one multi-task vector plus one binary mask per task; the task id
picks the mask at inference.

With τ_t = θ_t − θ0 for every floating-point tensor of the image tower:

1. **Multi-task vector** τ_MTL at unit scale: task arithmetic's Σ_t τ_t (the authors' default),
   or the output of another data-free base merge run with ``scaling_factor`` 1 (the authors'
   ``use_ties``: TIES top-20 %, disjoint sum), θ_MTL = θ0 + τ_MTL — the same base composition as
   :mod:`fusion_bench.method.consensus`.
2. **TALL mask** per task: m_t = 1{|θ0 − θ_t| > λ_t · |θ_MTL − θ_t|}, i.e.
   |τ_t| > λ_t |τ_MTL − τ_t| (strict, as the authors' ``generate_task_masks``): the entries where
   task t's own information dominates what the other tasks add.
3. **Per-task model**: θ̂_t = θ0 + m_t ⊙ τ_MTL (coefficient 1, the authors' ``scaling_coef=1.0``).

θ̂_t depends on λ_t only, so sweeping one λ and picking each task's best on validation is the
authors' per-task selection (they search λ ∈ {0.2, …, 0.6} on each task's validation split).

Run: ``fusion_bench method=routed/tall_masks`` (oracle task id: each task on its own θ̂_t),
``fusion_bench method=routed/tall_masks method.base=ties_merging`` (TALL mask + TIES).
Memory: the base merge's (about one image tower for task arithmetic and TIES), whose output
θ_MTL is kept (one image tower); each task's model is built when the evaluator asks for it, key by
key, reading that expert once to form its mask. Held besides the evaluated model: ~1 image tower,
independent of N. Stored to serve all tasks: θ0 + τ_MTL + N 1-bit masks = 2 + N/32 image towers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import (
    PerTaskMethod,
    StateDictMerge,
    key_progress,
    per_expert,
    pool_experts,
    require_experts,
)
from fusion_bench.method.consensus import tall_mask, unit_scale_base
from fusion_bench.method.routed import TaskModels
from fusion_bench.tensor_ops import Scratch, StateDict, expert_tensor, map_keys

# Options TALL sets on its base itself (the base runs at unit scale, on TALL's keys).
OWN_OPTIONS = ("scaling_factor", "exclude_keys")


@dataclass(frozen=True)
class TallMasks(PerTaskMethod):
    base: str = "task_arithmetic"  # the merge giving τ_MTL (data-free), run at unit scale
    base_options: dict[str, Any] = field(default_factory=dict)  # e.g. {threshold: 20} for TIES
    tall_mask_lambda: float | list[float] = 0.6  # λ_t, one or one per task (FusionBench: 0.6)
    exclude_keys: list[str] = field(default_factory=list)  # fnmatch patterns kept at θ0

    def __post_init__(self):
        lambdas = (
            self.tall_mask_lambda
            if isinstance(self.tall_mask_lambda, list)
            else [self.tall_mask_lambda]
        )
        if not lambdas or any(lam < 0 for lam in lambdas):
            raise FusionBenchError(
                f"method.tall_mask_lambda={self.tall_mask_lambda!r}: λ_t scales |τ_MTL − τ_t| in "
                "the TALL mask |τ_t| > λ_t |τ_MTL − τ_t|; give one value ≥ 0 or one per task in "
                "the pool's order (the authors pick each in 0.2 … 0.6)."
            )
        clash = sorted(set(self.base_options) & set(OWN_OPTIONS))
        if clash:
            raise FusionBenchError(
                f"method.base_options sets {clash}: TALL masks run the base at unit scale (θ̂_t = "
                "θ0 + m_t ⊙ τ_MTL, as the authors) on their own keys; remove it, and set "
                "method.exclude_keys instead."
            )
        self.base_method()  # the base's own checks, before anything is loaded

    def base_method(self) -> StateDictMerge:
        """The base merge at unit scale, on TALL's keys: its output is θ_MTL = θ0 + τ_MTL."""
        return unit_scale_base(self.base, self.base_options, self.exclude_keys)

    def models(self, pool: Any) -> TallModels:
        experts = pool_experts(pool)
        require_experts(experts, "TALL masks")
        lambdas = per_expert(
            self.tall_mask_lambda,
            list(experts),
            f"method.tall_mask_lambda={self.tall_mask_lambda!r}",
        )
        pretrained = pool.pretrained()
        multi_task = self.base_method().merge(pretrained, experts, key_progress("tall τ_MTL"))
        return TallModels(
            pretrained,
            experts,
            multi_task,
            dict(zip(experts, lambdas, strict=True)),
            self.exclude_keys,
        )

    def models_held(self, n_experts: int) -> float:
        return max(1.0, self.base_method().models_held(n_experts))  # θ_MTL (the base's output)

    def stored_models(self, n_experts: int) -> float:
        return 2.0 + n_experts / 32  # θ0 + τ_MTL + N 1-bit masks


class TallModels(TaskModels):
    """task -> θ̂_t = θ0 + m_t ⊙ τ_MTL, built when asked for (reading expert t once to form its
    TALL mask). ``multi_task`` (θ_MTL) and ``lambdas`` (λ_t) are what the masks are built from."""

    def __init__(
        self,
        pretrained: StateDict,
        experts: Mapping[str, StateDict],
        multi_task: Mapping[str, Tensor],
        lambdas: dict[str, float],
        exclude_keys: list[str],
    ):
        self.pretrained, self.experts = pretrained, experts
        self.multi_task, self.lambdas = multi_task, lambdas
        self.exclude_keys = list(exclude_keys)

    def mask(self, task: str, key: str, base: Tensor | None = None, scratch=None) -> Tensor:
        """m_t of ``key`` (bool; a scratch buffer when ``scratch`` is given)."""
        base = self.pretrained[key].to(torch.float32) if base is None else base
        theta = expert_tensor(self.experts[task], key, base, task)
        theta_mtl = self.multi_task[key].to(torch.float32)
        return tall_mask(base, theta_mtl, theta, self.lambdas[task], scratch)

    def build(self, task: str) -> dict[str, Tensor]:
        scratch = Scratch()

        def build_key(key: str, base: Tensor) -> Tensor:
            mask = self.mask(task, key, base, scratch)
            delta = torch.sub(self.multi_task[key].to(torch.float32), base)  # τ_MTL
            return delta.mul_(mask).add_(base)

        return map_keys(self.pretrained, build_key, self.exclude_keys)
