"""LiNeS: layer-increasing network scaling of a merged task vector (Wang et al., "LiNeS:
Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging", ICLR 2025).

A data-free ``base`` merge (task arithmetic, TIES, ... built by
:func:`fusion_bench.method.base.base_merge`, run with ``scaling_factor`` 1) gives the merged
task vector τ = θ_base − θ0, key by key. LiNeS rescales it by the depth of the transformer block
the key belongs to:

    θ = θ0 + λ(l) · τ,   λ(l) = α + β · l / (L − 1),   l = 0 … L − 1,

so the first block gets α and the last α + β (the paper's ℓ = 1 … L with (ℓ − 1)/(L − 1)). The
block index l comes from the key (``encoder.layers.<l>.`` for Hugging Face CLIP towers,
``transformer.resblocks.<l>.`` for open_clip ones); L is the number of blocks (largest index + 1).
Every key outside the blocks (patch/position embeddings, class token, pre- and post-LayerNorm,
projection) gets α, as in the authors' code. With L = 1 the single block gets α.

α defaults to the authors' multi-task rule α = ‖Σ_t τ_t‖₁ / (T · ‖τ‖₁) (L1 norms over every
merged key; T experts): 1/T after task arithmetic (τ = Σ_t τ_t), larger after TIES, whose merged
vector is smaller. β is tuned on validation data (the authors sweep 0.1 … 1.0 after task
arithmetic and consensus merging, 0.1 … 1.5 after TIES).

Run: ``fusion_bench method=lines method.beta=0.5``
     ``fusion_bench method=lines method.base=ties_merging ++method.base_options.merge_func=mean``
Memory: the base merge's (its output, ~1·P for the streaming bases), then key by key in place;
with ``alpha: null`` one more pass reads every expert once, key by key, for ‖Σ_t τ_t‖₁.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import Experts, Progress, StateDictMerge, base_merge
from fusion_bench.tensor_ops import StateDict, mergeable_keys, task_vector_sum

# A transformer block's index in a state-dict key: Hugging Face CLIP (``encoder.layers.3.``,
# transformers 4's ``vision_model.encoder.layers.3.``), open_clip (``transformer.resblocks.3.``).
BLOCK = re.compile(r"(?:^|\.)(?:layers|resblocks)\.(\d+)\.")


@dataclass(frozen=True)
class LiNeS(StateDictMerge):
    # Its scale of a key depends on the other keys (the deepest block, the norm ratio): it must
    # see the whole model at once (Core Space's per-weight scope refuses it).
    whole_model: ClassVar[bool] = True
    alpha: float | None = None  # λ of the first block and of keys outside the blocks; None: the
    # authors' multi-task rule ‖Σ_t τ_t‖₁ / (T ‖τ‖₁) (1/T after task arithmetic)
    beta: float = 0.5  # λ(last block) − λ(first block); tuned on validation (authors: 0.1 … 1.0)
    base: str = "task_arithmetic"  # the data-free merge whose task vector is scaled
    base_options: dict[str, Any] = field(default_factory=dict)  # over the base's YAML defaults

    def __post_init__(self):
        if self.alpha is not None and self.alpha < 0:
            raise FusionBenchError(
                f"method.alpha={self.alpha} is negative: α is the scale of the first block's "
                "merged task vector; give a value ≥ 0, or null for the authors' rule "
                "‖Σ τ_t‖₁ / (T ‖τ‖₁)."
            )
        if self.beta < 0:
            raise FusionBenchError(
                f"method.beta={self.beta} is negative: LiNeS scales deeper blocks more, "
                "λ(l) = α + β l/(L − 1); give β ≥ 0 (β = 0 is task arithmetic's uniform α)."
            )
        if "scaling_factor" in self.base_options:
            raise FusionBenchError(
                "method.base_options.scaling_factor is set: LiNeS scales the base's merged task "
                "vector itself (method.alpha, method.beta) and runs the base with scaling_factor "
                "1; remove it from base_options."
            )
        self.base_method()  # the base's own checks, before anything is loaded

    def base_method(self) -> StateDictMerge:
        """The base merge, at scaling factor 1 when it has one: its output − θ0 is the merged
        task vector τ that LiNeS scales."""
        method = base_merge(self.base, self.base_options)
        if any(f.name == "scaling_factor" for f in dataclasses.fields(method)):
            method = dataclasses.replace(method, scaling_factor=1.0)
        return method

    def models_held(self, n_experts: int) -> float:
        return self.base_method().models_held(n_experts)

    def merge(self, pretrained: StateDict, experts: Experts, progress: Progress = None):
        depth = block_depths(pretrained)
        base = self.base_method()
        out = dict(base.merge(pretrained, experts, progress))
        alpha = self.alpha
        if alpha is None:
            alpha = norm_ratio_alpha(pretrained, experts, out, base_exclusions(base), progress)
        for key in pretrained:
            theta0 = pretrained[key]
            if not theta0.is_floating_point():
                continue
            theta0 = theta0.to(torch.float32)
            tau = out[key].to(torch.float32) - theta0
            scale = layer_scale(alpha, self.beta, *depth.get(key, (0, 1)))
            out[key] = (theta0 + scale * tau).to(out[key].dtype)
        return out


def block_depths(pretrained: Iterable[str]) -> dict[str, tuple[int, int]]:
    """key -> (block index l, number of blocks L) for every key inside a transformer block; keys
    outside the blocks are absent. Refused when no key names a block."""
    index = {}
    for key in pretrained:
        match = BLOCK.search(key)
        if match:
            index[key] = int(match.group(1))
    if not index:
        sample = ", ".join(list(pretrained)[:3])
        raise FusionBenchError(
            "LiNeS scales the task vector by transformer-block depth, but no state-dict key names "
            "a block ('encoder.layers.<i>.' or 'transformer.resblocks.<i>.'; keys here: "
            f"{sample}, ...). Use a CLIP image tower of the Hugging Face or open_clip layout."
        )
    blocks = max(index.values()) + 1
    return {key: (i, blocks) for key, i in index.items()}


def layer_scale(alpha: float, beta: float, block: int, blocks: int) -> float:
    """λ(l) = α + β l / (L − 1) (α for a model of one block, and for keys outside the blocks)."""
    return alpha + beta * (block / (blocks - 1) if blocks > 1 else 0.0)


def base_exclusions(base: StateDictMerge) -> list[str]:
    return list(getattr(base, "exclude_keys", []) or [])


def norm_ratio_alpha(
    pretrained: StateDict,
    experts: Experts,
    merged: Mapping[str, torch.Tensor],
    exclude_keys: list[str],
    progress: Progress = None,
) -> float:
    """The authors' multi-task α: ‖Σ_t τ_t‖₁ / (T ‖τ_merged‖₁), L1 norms over the keys the base
    merges, accumulated in float64, key by key (one expert tensor at a time). If the merged
    vector is zero the output is θ0 whatever α; 1/T is returned then."""
    summed = merged_norm = 0.0
    keys: Iterable[str] = list(mergeable_keys(pretrained, exclude_keys))
    if progress is not None:
        keys = progress(keys)
    for key in keys:
        theta0 = pretrained[key].to(torch.float32)
        summed += float(task_vector_sum(experts, key, theta0).abs().sum(dtype=torch.float64))
        tau = merged[key].to(torch.float32) - theta0
        merged_norm += float(tau.abs().sum(dtype=torch.float64))
    ratio = summed / merged_norm if merged_norm > 0 else 1.0
    return ratio / len(experts)
