"""What every model pool provides, and the pieces the pools share (by composition).

A model pool knows one pretrained CLIP and N fine-tuned image towers ("experts", keyed by task).
Merge methods see only state dicts in the pool's *canonical* key layout (the keys of the image
tower module the pool builds), read lazily; evaluation sees a :class:`ZeroShotClassifier`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from fusion_bench.checkpoint import LazyStateDict
from fusion_bench.errors import FusionBenchError


@dataclass
class ZeroShotClassifier:
    """An image tower plus everything needed to classify zero-shot with it.

    logits = logit_scale · normalize(features(encoder, images)) @ head, where ``head`` (D, C) is
    built from class names × templates by ``zero_shot_head`` (the pretrained text tower).
    """

    encoder: nn.Module  # image tower, parameters named as the pool's canonical keys
    features: Callable[[nn.Module, Tensor], Tensor]  # (encoder, images (B,3,H,W)) -> (B, D)
    zero_shot_head: Callable[[Sequence[str], Sequence[str], torch.device], Tensor]
    preprocess: Callable  # PIL image -> (3, H, W) tensor
    logit_scale: float
    head_cache_key: str  # identity of text tower + pool family, for the on-disk head cache

    def logits(self, images: Tensor, head: Tensor) -> Tensor:
        feats = self.features(self.encoder, images)
        feats = feats / feats.norm(dim=-1, keepdim=True)
        return self.logit_scale * feats @ head


@runtime_checkable
class ModelPool(Protocol):
    """The interface methods and the runner rely on."""

    expert_names: list[str]

    def pretrained(self) -> LazyStateDict:
        """The pretrained image tower, lazily read."""
        ...

    def expert(self, name: str) -> LazyStateDict:
        """Expert ``name``'s fine-tuned image tower, lazily read."""
        ...

    def build_encoder(self, state_dict: Mapping[str, Tensor] | None = None) -> nn.Module:
        """A fresh image tower module, loaded with ``state_dict`` (default: the pretrained one)."""
        ...

    def classifier(self, encoder: nn.Module) -> ZeroShotClassifier:
        """Wrap an image tower for zero-shot evaluation with this pool's text tower."""
        ...

    def save(self, state_dict: Mapping[str, Tensor], path: Path, card: str) -> None:
        """Write a merged image tower in this pool's own checkpoint format, with a model card."""
        ...

    def describe(self) -> dict:
        """Plain-data description for reports (family, pretrained, experts)."""
        ...


def resolve_experts(
    finetuned: Mapping[str, str] | str,
    tasks: Sequence[str] | None,
    option: str = "modelpool.finetuned",
) -> dict[str, str]:
    """Expert name -> location, from an explicit mapping or a ``{task}`` template over ``tasks``.

    A template keeps the per-architecture configs to one line each (e.g.
    ``tanganke/clip-vit-base-patch32_{task}``) while the task list comes from the suite.
    """
    if isinstance(finetuned, str):
        if "{task}" not in finetuned:
            raise FusionBenchError(
                f"{option} is the string '{finetuned}' without a '{{task}}' "
                "placeholder: give a mapping {task: path} or a template such as "
                "'checkpoints/{task}.safetensors'."
            )
        if not tasks:
            raise FusionBenchError(
                f"{option} is a template but modelpool.tasks is empty: set "
                "`suite=<ta8|tall14|tall20|...>` or `modelpool.tasks=[...]`."
            )
        return {t: finetuned.format(task=t) for t in tasks}
    experts = dict(finetuned)
    if tasks:
        missing = [t for t in tasks if t not in experts]
        if missing:
            raise FusionBenchError(
                f"No fine-tuned checkpoint for task(s) {missing} in {option} (has "
                f"{sorted(experts)}). Add them, or remove them from modelpool.tasks."
            )
        experts = {t: experts[t] for t in tasks}
    return experts


def unknown_expert(name: str, known: Sequence[str]) -> FusionBenchError:
    from fusion_bench.errors import did_you_mean

    return FusionBenchError(
        f"The model pool has no expert '{name}' (it has {list(known)}).{did_you_mean(name, known)}"
    )


def cache_key(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]


def normalized_head(text_features_per_class: list[Tensor]) -> Tensor:
    """CLIP's prompt ensembling: mean of normalised template embeddings, renormalised.
    Input: one (T, D) tensor per class. Output: (D, C)."""
    cols = []
    for feats in text_features_per_class:
        feats = feats / feats.norm(dim=-1, keepdim=True)
        mean = feats.mean(dim=0)
        cols.append(mean / mean.norm())
    return torch.stack(cols, dim=1)
