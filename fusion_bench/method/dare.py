"""DARE ("Drop And REscale"; Yu et al., "Language Models are Super Mario: Absorbing Abilities from
Homologous Models as a Free Lunch", ICML 2024) in front of any data-free base merge.

Each task-vector entry is dropped with probability p (``sparsity_ratio``) and, with ``rescale``,
the survivors are divided by 1 − p, so E[drop(τ)] = τ. The dropped experts θ0 + drop(τ_i) are then
merged by ``base``, any data-free merge of ``conf/method/`` (kind ``merge``) built by
:func:`fusion_bench.method.base.base_merge` with ``base_options`` over its YAML defaults:
``task_arithmetic`` and ``ties_merging`` (FusionBench's DareTaskArithmetic / DareTiesMerging; TIES
trims the dropped vectors, its global top-k threshold computed on them), ``simple_average``
(DareSimpleAverage), ``magmax``, ``tsv_m`` ... With ``only_on_linear_weights`` only the weight
matrices of linear layers are dropped (FusionBench's option); every other tensor keeps its whole τ.

Reproducible and streaming: each expert is wrapped in a lazy view whose drop mask for a key is
drawn from a generator seeded by (``seed``, expert index, key). Every read of a key gives the same
dropped tensor, whatever order the base method visits keys in and however many passes it makes
(TIES makes three), so nothing is cached and memory is that of the base method.

Run: ``fusion_bench method=dare_ties_merging`` (FusionBench's defaults), or
``fusion_bench method=dare method.base=magmax method.sparsity_ratio=0.9``
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import Experts, Progress, StateDictMerge, base_merge
from fusion_bench.tensor_ops import StateDict, expert_tensor


@dataclass(frozen=True)
class Dare(StateDictMerge):
    base: str = "task_arithmetic"  # any data-free merge of conf/method/ (kind 'merge')
    base_options: dict[str, Any] = field(default_factory=dict)  # over the base's YAML defaults
    sparsity_ratio: float = 0.5  # p, the drop probability (the paper's and FusionBench's 0.5)
    rescale: bool = True  # divide the kept entries by 1 − p (keeps E[τ])
    only_on_linear_weights: bool = False  # drop only linear layers' weight matrices (FusionBench)
    seed: int = 0  # drop masks are drawn per (seed, expert, key): reproducible, order-free

    def __post_init__(self):
        check_sparsity(self.sparsity_ratio)
        self.base_method()  # the base's own checks (unknown base, bad options), before loading

    def base_method(self) -> StateDictMerge:
        return base_merge(self.base, self.base_options)

    def models_held(self, n_experts: int) -> float:
        return self.base_method().models_held(n_experts)

    def merge(self, pretrained: StateDict, experts: Experts, progress: Progress = None):
        dropped = {
            name: DroppedExpert(pretrained, expert, index, self, name)
            for index, (name, expert) in enumerate(experts.items())
        }
        return self.base_method().merge(pretrained, dropped, progress)


class DroppedExpert(Mapping[str, Tensor]):
    """Lazy view of θ0 + drop(θ − θ0): same keys as the expert; non-floating keys (and, with
    ``only_on_linear_weights``, every key but the linear weights) pass through unchanged."""

    def __init__(self, pretrained: StateDict, expert: StateDict, index: int, dare: Dare, name: str):
        self.pretrained, self.expert, self.name = pretrained, expert, name
        self.index, self.dare = index, dare

    def __getitem__(self, key: str) -> Tensor:
        base, p = self.pretrained[key], self.dare.sparsity_ratio
        if (
            not base.is_floating_point()
            or p == 0.0  # nothing dropped, scale 1: the expert itself, exactly
            or (self.dare.only_on_linear_weights and not is_linear_weight(key, base))
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


def is_linear_weight(key: str, tensor: Tensor) -> bool:
    """The weight matrix of an ``nn.Linear`` in the CLIP image-tower layouts: a 2-D ``*.weight``
    that is not an embedding table. Hugging Face: ``q/k/v/out_proj``, ``fc1``, ``fc2``; open_clip:
    ``attn.out_proj``, ``mlp.c_fc``, ``mlp.c_proj`` (its ``attn.in_proj_weight`` and ``proj`` are
    bare parameters, as FusionBench's ``isinstance(module, nn.Linear)`` sees them)."""
    return key.endswith(".weight") and tensor.dim() == 2 and "embedding" not in key


def check_sparsity(sparsity_ratio: float) -> None:
    if not 0.0 <= sparsity_ratio < 1.0:
        raise FusionBenchError(
            f"method.sparsity_ratio={sparsity_ratio} must be in [0, 1): it is the probability of "
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
    (which keeps the expectation equal to τ). An entry is kept when its uniform draw u ≥ p:
    P(keep) = 1 − p exactly on torch's 2⁻²⁴ grid (FusionBench keeps u > p, 2⁻²⁴ less)."""
    check_sparsity(sparsity_ratio)
    keep = torch.rand(tau.shape, generator=generator) >= sparsity_ratio
    dropped = tau * keep
    return dropped / (1.0 - sparsity_ratio) if rescale else dropped
