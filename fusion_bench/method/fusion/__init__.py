"""Fusion of independently trained towers (no common pretrained model): align every model's
neurons to an anchor model, then average. Kind ``data_merge``; the pool is an
:class:`~fusion_bench.modelpool.independent.IndependentModelPool` (``modelpool=tiny8_scratch``).

- ``fusion/vanilla_average``: no alignment (the baseline that collapses);
- ``fusion/weight_matching``: Git Re-Basin's weight matching (permutations, SciPy's LAP);
- ``fusion/activation_matching``: permutations from activation statistics;
- ``fusion/ot_fusion``: Imfeld et al.'s transformer OT fusion (POT; EMD or Sinkhorn; weights or
  activations; models of different widths);
- ``fusion/pleas``: PLeaS (activation matching, partial merging to a chosen MLP width, per-layer
  least squares);
- ``fusion/parent``: one member as it is (a row of the comparison; optionally fine-tuned too).

Every method can fine-tune its result for ``finetune_steps`` steps (the papers' "after a short
fine-tuning" protocol, :mod:`fusion_bench.method.fusion.finetune`). This module holds what they
share: loading the members, activation statistics, averaging aligned models.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.fusion.align import apply_maps, groups
from fusion_bench.method.fusion.tower import TowerSpec, forward

# which recorded activations define each group's neurons (see tower.py's table)
GROUP_NODES = {"qk": ("q.", "k."), "v": ("v.",), "mlp": ("fc.",)}  # res: node_names()


@dataclass
class Members:
    """The pool's towers in float32, their specs, and which one is the anchor."""

    names: list[str]
    specs: dict[str, TowerSpec]
    states: dict[str, dict[str, Tensor]]
    anchor: str

    @property
    def others(self) -> list[str]:
        return [n for n in self.names if n != self.anchor]


def load_members(pool, anchor: str | None, method: str) -> Members:
    """Every model of ``pool`` (float32, in memory: alignment reads each weight many times)."""
    if not hasattr(pool, "spec") or getattr(pool, "shared_init", True):
        raise FusionBenchError(
            f"{method} fuses independently trained towers: it needs an independent model pool "
            "(modelpool=tiny8_scratch, or fusion_bench.modelpool.independent."
            "IndependentModelPool with your models); this pool is "
            f"{type(pool).__name__}. For experts fine-tuned from one pretrained model use the "
            "merging methods (their neurons are already aligned)."
        )
    pool.check_members()
    names = list(pool.expert_names)
    if anchor is None:
        anchor = names[0]
    if anchor not in names:
        from fusion_bench.errors import did_you_mean

        raise FusionBenchError(
            f"method.anchor '{anchor}' is not a model of the pool ({names})."
            f"{did_you_mean(anchor, names)}"
        )
    specs = {n: pool.spec(n) for n in names}
    states = {}
    for n in names:
        lazy = pool.expert(n)
        states[n] = {k: lazy[k].float() for k in lazy}
    return Members(names, specs, states, anchor)


def held(n_models: int, finetune_steps: int) -> float:
    """``models_held`` of an alignment method: the K models in fp32 and the output; the optional
    fine-tuning holds the fused state, its tower, gradients and AdamW's two moments (5 towers;
    the models are freed first)."""
    return n_models + 1.0 if finetune_steps <= 0 else max(n_models + 1.0, 5.0)


def average(states: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The uniform mean of models of one shape (each key)."""
    first = states[0]
    for s in states[1:]:
        bad = [k for k in first if s[k].shape != first[k].shape]
        if bad:
            raise FusionBenchError(
                f"Cannot average models of different shapes ({bad[0]}: "
                f"{tuple(first[bad[0]].shape)} vs {tuple(s[bad[0]].shape)}): vanilla averaging "
                "needs equal widths; fusion/ot_fusion fuses models of different widths."
            )
    return {k: sum(s[k] for s in states) / len(states) for k in first}


def fuse(members: Members, maps: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Every model written in the anchor's basis (``maps[name]``: {group: coupling}; the anchor
    needs none), then averaged uniformly."""
    aligned = [members.states[members.anchor]] + [
        apply_maps(members.states[n], members.specs[n], maps[n]) for n in members.others
    ]
    return average(aligned)


def require_equal_shapes(members, method: str) -> None:
    ref = members.specs[members.anchor]
    for n in members.others:
        s = members.specs[n]
        if (s.width, s.heads, s.mlp) != (ref.width, ref.heads, ref.mlp):
            raise FusionBenchError(
                f"{method} permutes neurons, so every model needs the anchor's shape: "
                f"'{n}' has width {s.width}, {s.heads} heads, MLP {s.mlp[0]}; anchor "
                f"'{members.anchor}' has {ref.width}, {ref.heads}, {ref.mlp[0]}. "
                "fusion/ot_fusion fuses models of different widths."
            )


# -- data --------------------------------------------------------------------------------------
def tasks_of(pool, method: str) -> list[str]:
    tasks = list(getattr(pool, "tasks", []) or [])
    if not tasks:
        raise FusionBenchError(
            f"{method} needs images: set modelpool.tasks (the tasks the models classify, e.g. "
            "${suite.tasks})."
        )
    return tasks


def check_image_sample(num_samples: int, batch_size: int, split: str) -> None:
    """A method's unlabelled-image options, checked at construction."""
    from fusion_bench.taskpool.data import check_sample_size

    check_sample_size(num_samples, batch_size)
    if split not in ("train", "validation"):
        raise FusionBenchError(
            f"method.split={split!r}: align on 'train' or 'validation' images, never on the "
            "test split."
        )


def image_batches(
    pool, data, tasks: Sequence[str], split: str, num_samples: int, batch_size: int, seed: int
) -> Iterator[Tensor]:
    """A seeded sample of ``num_samples`` images spread evenly over ``tasks`` (labels unread)."""
    per_task = max(1, math.ceil(num_samples / len(tasks)))
    for task in tasks:
        yield from data.images(task, split, pool.preprocess, per_task, batch_size, seed)


@dataclass
class ActivationStats:
    """Sufficient statistics of two towers' activations per neuron group, accumulated batch by
    batch (memory: one n_model × n_anchor matrix per group, whatever the number of images):
    cross products Σ a bᵀ, per-neuron sums and sums of squares, and the row count — of the
    activations minus a per-neuron shift (the first batch's mean), so that variances are not
    lost to cancellation (a constant neuron has variance exactly 0)."""

    cross: dict[str, Tensor] = field(default_factory=dict)
    shift: dict[str, list[Tensor]] = field(default_factory=dict)  # [model, anchor]
    sums: dict[str, list[Tensor]] = field(default_factory=dict)
    squares: dict[str, list[Tensor]] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)

    def add(self, group: str, a: Tensor, b: Tensor) -> None:
        a, b = a.double(), b.double()
        if group not in self.cross:
            self.shift[group] = [a.mean(0), b.mean(0)]
            a, b = a - self.shift[group][0], b - self.shift[group][1]
            self.cross[group] = a.T @ b
            self.sums[group] = [a.sum(0), b.sum(0)]
            self.squares[group] = [(a * a).sum(0), (b * b).sum(0)]
            self.rows[group] = a.shape[0]
            return
        a, b = a - self.shift[group][0], b - self.shift[group][1]
        self.cross[group] += a.T @ b
        self.sums[group][0] += a.sum(0)
        self.sums[group][1] += b.sum(0)
        self.squares[group][0] += (a * a).sum(0)
        self.squares[group][1] += (b * b).sum(0)
        self.rows[group] += a.shape[0]

    def distance(self, group: str, standardize: bool, squared: bool = False) -> Tensor:
        """(n_model, n_anchor) Euclidean distances between the neurons' activation vectors
        (over every image, token and node of the group); ``standardize``: of each neuron's
        activations z-scored first (Imfeld et al.'s ``std``: (a − mean) / (std + 1e-9))."""
        n = self.rows[group]
        (sa, sb), (qa, qb), cross = self.sums[group], self.squares[group], self.cross[group]
        if standardize:  # shift-invariant: the shifted statistics give it directly
            ma, mb = sa / n, sb / n
            va, vb = (qa / n - ma * ma).clamp_min(0), (qb / n - mb * mb).clamp_min(0)
            da, db = va.sqrt() + 1e-9, vb.sqrt() + 1e-9
            corr = (cross - n * ma[:, None] * mb[None, :]) / (da[:, None] * db[None, :])
            d2 = (n * va / da**2)[:, None] + (n * vb / db**2)[None, :] - 2 * corr
        else:  # Σ_r (a'_ri + s_i − b'_rj − t_j)², a' and b' the shifted activations
            delta = self.shift[group][0][:, None] - self.shift[group][1][None, :]
            d2 = (
                qa[:, None]
                + qb[None, :]
                - 2 * cross
                + 2 * delta * (sa[:, None] - sb[None, :])
                + n * delta**2
            )
        d2 = d2.clamp_min(0)
        return d2 if squared else d2.sqrt()


def node_names(group: str, spec: TowerSpec) -> list[str]:
    """The recorded activations that belong to ``group``."""
    kind, _, index = group.partition(".")
    if kind == "res":
        return ["emb"] + [f"res.{i}" for i in range(spec.layers + 1)]
    return [prefix + index for prefix in GROUP_NODES[kind]]


def activation_stats(
    members: Members, batches: Iterator[Tensor], device, progress: str | None = None
) -> dict[str, ActivationStats]:
    """For every non-anchor model, its activations' statistics against the anchor's, per
    group, on the same images."""
    from tqdm.auto import tqdm

    stats = {n: ActivationStats() for n in members.others}
    on = {n: {k: v.to(device) for k, v in members.states[n].items()} for n in members.names}
    anchor_spec = members.specs[members.anchor]
    for images in tqdm(batches, desc=progress or "activations", unit="batch", leave=False):
        images = images.to(device)
        with torch.no_grad():
            _, ref = forward(on[members.anchor], anchor_spec, images, record=True)
            for n in members.others:
                spec = members.specs[n]
                _, acts = forward(on[n], spec, images, record=True)
                for group in groups(spec):
                    for node in node_names(group, spec):
                        stats[n].add(group, acts[node].cpu(), ref[node].cpu())
    return stats
