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

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import Experts, Progress, StateDictMerge
from fusion_bench.method.simple_average import SimpleAverage
from fusion_bench.method.task_arithmetic import TaskArithmetic
from fusion_bench.method.ties_merging import TiesMerging
from fusion_bench.tensor_ops import StateDict, expert_tensor, is_excluded

BASES = ("simple_average", "task_arithmetic", "ties_merging")


@dataclass(frozen=True)
class Dare(StateDictMerge):
    base: str = "task_arithmetic"  # simple_average | task_arithmetic | ties_merging
    sparsity_ratio: float = 0.5  # p, the drop probability (FusionBench's default)
    rescale: bool = True  # divide the kept entries by 1 − p (keeps E[τ])
    seed: int = 0  # drop masks are drawn per (seed, expert, key): reproducible, order-free
    # the base method's hyper-parameters (threshold and merge_func: ties_merging only)
    scaling_factor: float | list[float] = 0.3
    threshold: float = 20
    merge_func: str = "sum"
    exclude_keys: list[str] = field(default_factory=list)  # fnmatch patterns kept at θ0

    def __post_init__(self):
        if self.base not in BASES:
            raise FusionBenchError(
                f"DARE base '{self.base}' is not one of {list(BASES)}: set method.base to the "
                "merge DARE is applied in front of."
            )
        check_sparsity(self.sparsity_ratio)
        self.base_method()  # the base's own checks (merge_func, threshold), before any loading

    def base_method(self) -> StateDictMerge:
        if self.base == "simple_average":
            return SimpleAverage(exclude_keys=self.exclude_keys)
        if self.base == "task_arithmetic":
            return TaskArithmetic(self.scaling_factor, self.exclude_keys)
        return TiesMerging(self.scaling_factor, self.threshold, self.merge_func, self.exclude_keys)

    def merge(self, pretrained: StateDict, experts: Experts, progress: Progress = None):
        dropped = {
            name: DroppedExpert(pretrained, expert, index, self, name)
            for index, (name, expert) in enumerate(experts.items())
        }
        return self.base_method().merge(pretrained, dropped, progress)


class DroppedExpert(Mapping[str, Tensor]):
    """Lazy view of θ0 + drop(θ − θ0): same keys as the expert; non-floating and excluded keys
    pass through unchanged (the base method copies them from θ0 anyway)."""

    def __init__(self, pretrained: StateDict, expert: StateDict, index: int, dare: Dare, name: str):
        self.pretrained, self.expert, self.name = pretrained, expert, name
        self.index, self.dare = index, dare

    def __getitem__(self, key: str) -> Tensor:
        base, p = self.pretrained[key], self.dare.sparsity_ratio
        if (
            not base.is_floating_point()
            or is_excluded(key, self.dare.exclude_keys)
            or p == 0.0  # nothing dropped, scale 1: the expert itself, exactly
        ):
            return self.expert[key]
        base = base.to(torch.float32)
        tau = expert_tensor(self.expert, key, base, self.name) - base
        generator = torch.Generator().manual_seed(key_seed(self.dare.seed, self.index, key))
        return base + dare_drop(tau, p, self.dare.rescale, generator)

    def __iter__(self) -> Iterator[str]:
        return iter(self.expert)

    def __len__(self) -> int:
        return len(self.expert)

    def __contains__(self, key: object) -> bool:
        return key in self.expert


def check_sparsity(sparsity_ratio: float) -> None:
    if not 0.0 <= sparsity_ratio < 1.0:
        raise FusionBenchError(
            f"sparsity_ratio {sparsity_ratio} must be in [0, 1): it is the probability of "
            "dropping a task-vector entry (DARE's default is 0.5)."
        )


def key_seed(seed: int, index: int, key: str) -> int:
    """A 63-bit seed for (run seed, expert index, state-dict key): random draws per key do not
    depend on the order keys are visited in, so several passes regenerate the same draws."""
    digest = hashlib.blake2b(f"{seed}\x1f{index}\x1f{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def dare_drop(
    tau: Tensor, sparsity_ratio: float, rescale: bool, generator: torch.Generator
) -> Tensor:
    """DARE: drop each entry with probability p and, with ``rescale``, divide the rest by 1 − p
    (which keeps the expectation equal to τ)."""
    check_sparsity(sparsity_ratio)
    keep = torch.rand(tau.shape, generator=generator) >= sparsity_ratio
    dropped = tau * keep
    return dropped / (1.0 - sparsity_ratio) if rescale else dropped
