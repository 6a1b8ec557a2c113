"""Routed merging ("MoErging") and task-id methods: models that pick their experts per input.

- kind ``routed`` (:class:`~fusion_bench.method.base.RoutedMethod`): the method builds a
  :class:`~fusion_bench.method.base.RoutedModel` whose router decides per input (task-agnostic);
  the same model also runs with an oracle task id (``forward(images, task=name)``), reported
  separately as an upper bound, with the router's accuracy. MASS, SMILE, WEMoE, Twin-Merging.
- kind ``per_task`` (:class:`~fusion_bench.method.base.PerTaskMethod`): one model per task, picked
  by the task id (oracle only). EMR-Merging, TALL masks.

Saved routed models (``merged_model_save_path=DIR``) reload with ``method=routed/checkpoint``
(:mod:`fusion_bench.method.routed.checkpoint`). Costs (stored parameters relative to one
pretrained tower, forward passes per image) are in every report; docs/routed.md compares them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping

from torch import Tensor, nn
from torch.func import functional_call

from fusion_bench.errors import FusionBenchError


class Tower(nn.Module):
    """The pool's image tower (θ0 as its parameters) plus the pool's feature function, runnable
    with any weights swapped in: ``tower(images, weights)`` computes the joint-space features with
    ``weights`` (a {canonical key: tensor} mapping, any subset of the keys) in place of θ0, through
    ``torch.func.functional_call`` (no copy of the module). Works for every pool family: the
    feature function is the pool's own (``pool.classifier(encoder).features``)."""

    def __init__(self, pool) -> None:
        super().__init__()
        self.encoder = pool.build_encoder()
        self._features: Callable[[nn.Module, Tensor], Tensor] = pool.classifier(
            self.encoder
        ).features

    def forward(self, images: Tensor, weights: Mapping[str, Tensor] | None = None) -> Tensor:
        if not weights:
            return self._features(self.encoder, images)
        swapped = {f"encoder.{k}": v for k, v in weights.items()}
        return functional_call(self, swapped, (images,), {"weights": None}, strict=False)

    def pretrained(self) -> dict[str, Tensor]:
        """θ0 as {canonical key: tensor} (the module's own parameters and buffers, no copy)."""
        return dict(self.encoder.state_dict(keep_vars=True))


_MLP_INPUT = re.compile(r"(?:^|\.)(\d+)\.mlp\.(?:c_fc|fc1)$")  # open_clip | Hugging Face CLIP


def mlp_inputs(encoder: nn.Module) -> list[str]:
    """Names of the first linear layer of every transformer block's MLP, in block order (open_clip
    ``transformer.resblocks.<i>.mlp.c_fc``, Hugging Face ``encoder.layers.<i>.mlp.fc1``): its input
    is the block's normalised residual stream (``ln_2`` output), batch first, token 0 = CLS."""
    found = {
        int(m.group(1)): name
        for name, _ in encoder.named_modules()
        if (m := _MLP_INPUT.search(name))
    }
    if not found:
        raise FusionBenchError(
            f"{type(encoder).__name__} has no transformer blocks named '<i>.mlp.c_fc' (open_clip) "
            "or '<i>.mlp.fc1' (Hugging Face CLIP): routed methods need a CLIP ViT image tower."
        )
    return [found[i] for i in sorted(found)]


def check_layer(layer: int, n_layers: int, option: str) -> int:
    """A block index given by the user (negative counts from the end), or a clear error."""
    index = layer + n_layers if layer < 0 else layer
    if not 0 <= index < n_layers:
        raise FusionBenchError(
            f"method.{option}={layer}: this image tower has {n_layers} transformer blocks "
            f"(0 … {n_layers - 1}, or −1 for the last)."
        )
    return index


class TaskModels(Mapping):
    """task -> state dict of a per-task method, built by ``build(task)`` only when asked (the
    evaluator asks for one task at a time, so one task's model is held). ``self.experts``: the
    pool's experts by task; membership, order and length come from it without building."""

    experts: Mapping

    def build(self, task: str) -> dict[str, Tensor]:
        raise NotImplementedError

    def __getitem__(self, task: str) -> dict[str, Tensor]:
        if task not in self.experts:
            raise KeyError(task)
        return self.build(task)

    def __contains__(self, task: object) -> bool:
        return task in self.experts

    def __iter__(self) -> Iterator[str]:
        return iter(self.experts)

    def __len__(self) -> int:
        return len(self.experts)
