"""Transformer fusion with optimal transport (Imfeld, Graldi, Giordano, Hofmann, Anagnostidis &
Singh, ICLR 2024): each neuron group of every other model is transported onto the anchor's
neurons by an optimal transport plan between uniform marginals (POT: exact ``emd`` or entropic
``sinkhorn``), the plans carried through the tower (the next layer's inputs follow its input's
plan), then the aligned models are averaged. The anchor's shape is kept, so models of another
width are fused into the anchor's width (heterogeneous fusion).

Ground cost (``cost``): ``acts``, the Euclidean distance between neurons' z-scored activations on
``num_samples`` images (the authors' default), or ``wts``, between the neurons' weight rows
normalised to unit length, in forward order (the residual stream's plan from the patch, class and
position embeddings; then per block queries/keys, values, MLP, each from its rows with the inputs
already transported). The cost is divided by its maximum; ``reg`` is Sinkhorn's regularisation on
that scale (default: the authors' 0.08 with acts, 0.06 with wts).

How plans act on weights (align.py): producing side, anchor neuron = plan-weighted mean of the
model's neurons; consuming side, each model neuron's input weight is shared by the anchor neurons
it is sent to. Where this implementation differs from the authors' code (docs page): one
residual-stream plan for the tower instead of an average of plans at every residual addition,
queries and keys share one plan (their ``eq_t_map`` option; their default plans them separately),
and the K models are averaged uniformly (their main script weighs the anchor ½).

Run: ``fusion_bench modelpool=tiny8_scratch method=fusion/ot_fusion``
Memory: the K models (fp32), the output, one (n × n) statistic per group and model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import Context, DataMerge
from fusion_bench.method.fusion import (
    activation_stats,
    check_image_sample,
    fuse,
    held,
    image_batches,
    load_members,
    tasks_of,
)
from fusion_bench.method.fusion.align import apply_maps, groups, rows, transport
from fusion_bench.method.fusion.finetune import finish
from fusion_bench.method.fusion.tower import TowerSpec

EMBEDDING = ("conv1.weight", "class_embedding", "positional_embedding")


def weight_features(state: Mapping[str, Tensor], spec: TowerSpec, group: str) -> Tensor:
    """(n, features): the group's neurons as the rows that produce them, each of unit length."""
    uses = [u for u in groups(spec)[group] if u.out]
    if group == "res":
        uses = [u for u in uses if u.key in EMBEDDING]
    feats = torch.cat([rows(state[u.key], u.axis, u.part) for u in uses], dim=1).double()
    return feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)


def weight_plans(
    anchor: Mapping[str, Tensor],
    model: Mapping[str, Tensor],
    spec: TowerSpec,
    anchor_spec: TowerSpec,
    solver: str,
    reg: float,
) -> dict[str, Tensor]:
    """{group: plan} from weights, in forward order (each group's inputs already transported)."""
    plans: dict[str, Tensor] = {}
    for g in groups(spec):
        keys = {u.key for u in groups(spec)[g]}
        partial = apply_maps({k: model[k] for k in keys}, spec, plans, keep_chunks=True)
        cost = torch.cdist(
            weight_features(partial, spec, g), weight_features(anchor, anchor_spec, g)
        )
        plans[g] = transport(cost, solver, reg)
    return plans


@dataclass(frozen=True)
class OTFusion(DataMerge):
    anchor: str | None = None  # whose shape and neuron order the fused model has
    cost: Literal["acts", "wts"] = "acts"
    solver: Literal["emd", "sinkhorn"] = "sinkhorn"
    reg: float | None = (
        None  # Sinkhorn's regularisation (max-normalised cost); None: 0.08 acts, 0.06 wts
    )
    num_samples: int = 200  # images for the activation cost (the authors: 200)
    batch_size: int = 50
    split: str = "train"
    seed: int = 0
    finetune_steps: int = 0
    finetune_lr: float = 1e-4
    finetune_batch_size: int = 64

    def __post_init__(self):
        check_image_sample(self.num_samples, self.batch_size, self.split)
        if self.solver == "sinkhorn" and self.reg is not None and not self.reg > 0:
            raise FusionBenchError(
                f"method.reg={self.reg}: Sinkhorn needs a regularisation > 0 (the authors: "
                "0.06-0.08); for exact transport use method.solver=emd."
            )

    def models_held(self, n_experts: int) -> float:
        return held(n_experts, self.finetune_steps)

    @property
    def regularisation(self) -> float:
        """``reg``, or the authors' value for the cost: 0.08 with activations, 0.06 with weights."""
        if self.reg is not None:
            return self.reg
        return 0.08 if self.cost == "acts" else 0.06

    def merge(self, pool, data, context: Context):
        members = load_members(pool, self.anchor, "fusion/ot_fusion")
        tasks = list(getattr(pool, "tasks", []) or [])
        if self.cost == "acts":
            tasks = tasks_of(pool, "fusion/ot_fusion with cost=acts")
            n = self.batch_size if context.fast_dev_run else self.num_samples
            batches = image_batches(pool, data, tasks, self.split, n, self.batch_size, self.seed)
            stats = activation_stats(members, batches, context.device, "OT fusion activations")
            plans = {
                name: {
                    g: transport(
                        stats[name].distance(g, standardize=True), self.solver, self.regularisation
                    )
                    for g in groups(members.specs[name])
                }
                for name in members.others
            }
        else:
            anchor = members.states[members.anchor]
            plans = {
                name: weight_plans(
                    anchor,
                    members.states[name],
                    members.specs[name],
                    members.specs[members.anchor],
                    self.solver,
                    self.regularisation,
                )
                for name in members.others
            }
        fused = fuse(members, plans)
        del members  # the K models are not needed while fine-tuning
        return finish(self, pool, fused, data, context, tasks)
