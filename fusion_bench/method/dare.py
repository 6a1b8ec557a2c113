"""DARE ("Drop And REscale"; Yu et al., "Language Models are Super Mario: Absorbing Abilities from
Homologous Models as a Free Lunch", ICML 2024) in front of a base merge.

Each task-vector entry is dropped with probability p (``sparsity_ratio``) and, with ``rescale``,
the survivors are divided by 1 − p, so E[drop(τ)] = τ. The dropped experts θ0 + drop(τ_i) are then
merged by ``base``: ``simple_average``, ``task_arithmetic`` (with ``scaling_factor``) or
``ties_merging`` (with ``scaling_factor``, ``threshold`` and ``merge_func``; its global top-k
threshold is computed on the dropped vectors).

Reproducible and streaming: each expert is wrapped in a lazy view whose drop mask for a key is
drawn from a generator seeded by (``seed``, expert index, key). Every read of a key gives the same
dropped tensor, whatever order the base method visits keys in and however many passes it makes
(TIES makes four), so nothing is cached and memory is that of the base method.

Run: ``fusion_bench method=dare method.base=ties_merging method.sparsity_ratio=0.5``
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import merge_pool
from fusion_bench.method.simple_average import simple_average
from fusion_bench.method.task_arithmetic import task_arithmetic
from fusion_bench.method.ties_merging import ties_merging
from fusion_bench.tensor_ops import (
    StateDict,
    dare_drop,
    expert_labels,
    expert_tensor,
    is_excluded,
    key_seed,
)

BASES = ("simple_average", "task_arithmetic", "ties_merging")


class DroppedExpert(Mapping[str, Tensor]):
    """Lazy view of θ0 + drop(θ − θ0): same keys as the expert; non-floating and excluded keys
    pass through unchanged (the base method copies them from θ0 anyway)."""

    def __init__(
        self,
        pretrained: StateDict,
        expert: StateDict,
        index: int,
        seed: int,
        sparsity_ratio: float,
        rescale: bool,
        exclude_keys: Sequence[str] = (),
        name: str = "expert",
    ):
        self.pretrained, self.expert, self.index, self.seed = pretrained, expert, index, seed
        self.sparsity_ratio, self.rescale = sparsity_ratio, rescale
        self.exclude_keys, self.name = list(exclude_keys), name

    def __getitem__(self, key: str) -> Tensor:
        base = self.pretrained[key]
        if (
            not base.is_floating_point()
            or is_excluded(key, self.exclude_keys)
            or self.sparsity_ratio == 0.0  # nothing dropped, scale 1: the expert itself, exactly
        ):
            return self.expert[key]
        base = base.to(torch.float32)
        tau = expert_tensor(self.expert, key, base, self.name) - base
        generator = torch.Generator().manual_seed(key_seed(self.seed, self.index, key))
        return base + dare_drop(tau, self.sparsity_ratio, self.rescale, generator)

    def __iter__(self) -> Iterator[str]:
        return iter(self.expert)

    def __len__(self) -> int:
        return len(self.expert)

    def __contains__(self, key: object) -> bool:
        return key in self.expert


def dare(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    base: str = "task_arithmetic",
    sparsity_ratio: float = 0.5,
    rescale: bool = True,
    seed: int = 0,
    scaling_factor: float | Sequence[float] = 0.3,
    threshold: float = 20,
    merge_func: str = "sum",
    exclude_keys: Sequence[str] = (),
    names: Sequence[str] | None = None,
    progress=None,
) -> dict[str, Tensor]:
    check_base(base)
    dare_drop(torch.zeros(0), sparsity_ratio, rescale, torch.Generator())  # validates p early
    names = expert_labels(finetuned, names)
    dropped = [
        DroppedExpert(pretrained, e, i, seed, sparsity_ratio, rescale, exclude_keys, n)
        for i, (e, n) in enumerate(zip(finetuned, names, strict=True))
    ]
    if base == "simple_average":
        return simple_average(pretrained, dropped, exclude_keys, names, progress)
    if base == "task_arithmetic":
        return task_arithmetic(pretrained, dropped, scaling_factor, exclude_keys, names, progress)
    return ties_merging(
        pretrained, dropped, scaling_factor, threshold, merge_func, exclude_keys, names, progress
    )


def check_base(base: str) -> None:
    if base not in BASES:
        raise FusionBenchError(
            f"DARE base '{base}' is not one of {list(BASES)}: set method.base to the merge DARE "
            "is applied in front of."
        )


class Dare:
    models_held = 1.0  # as the base method: the output; dropped tensors are regenerated per read

    def __init__(
        self,
        base: str = "task_arithmetic",
        sparsity_ratio: float = 0.5,
        rescale: bool = True,
        seed: int = 0,
        scaling_factor: float | list[float] = 0.3,
        threshold: float = 20,
        merge_func: str = "sum",
        exclude_keys: list[str] | None = None,
    ):
        check_base(base)
        self.base = base
        self.sparsity_ratio = sparsity_ratio
        self.rescale = rescale
        self.seed = seed
        self.scaling_factor = scaling_factor
        self.threshold = threshold
        self.merge_func = merge_func
        self.exclude_keys = list(exclude_keys or [])

    def run(self, modelpool, fabric=None) -> dict[str, Tensor]:
        scaling = self.scaling_factor
        if not isinstance(scaling, (int, float)):
            scaling = list(scaling)
        return merge_pool(
            dare,
            modelpool,
            f"dare+{self.base}",
            self.base,
            self.sparsity_ratio,
            self.rescale,
            self.seed,
            scaling,
            self.threshold,
            self.merge_func,
            self.exclude_keys,
        )
