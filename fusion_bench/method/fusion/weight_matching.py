"""Weight matching (Git Re-Basin; Ainsworth, Hayase & Srinivasa, ICLR 2023): permute every other
model's neurons to maximise Σ_layers ⟨W_anchor, P_ℓ W_model P_{ℓ-1}ᵀ⟩ over all weights, biases
and norm parameters, by coordinate descent (one linear assignment per neuron group with the
others fixed, groups in a fresh random order each sweep, until a sweep changes nothing or
``max_iter`` sweeps), then average the aligned models.

Attention follows its symmetries exactly: heads move whole (one head assignment for queries,
keys and values) and neurons permute inside a head, one way for queries and keys (q·k kept),
another for values and out_proj's input; the residual stream
has one permutation for the whole tower (align.py). A permuted copy of the anchor is recovered
exactly (test).

Run: ``fusion_bench modelpool=tiny8_scratch method=fusion/weight_matching``
Memory: the K models (fp32), the output, one group's similarity matrix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import Context, DataMerge
from fusion_bench.method.fusion import fuse, held, load_members, require_equal_shapes
from fusion_bench.method.fusion.align import (
    apply_maps,
    assign_unit,
    group_size,
    groups,
    rows,
    units,
)
from fusion_bench.method.fusion.finetune import finish
from fusion_bench.method.fusion.tower import TowerSpec


def similarity(
    anchor: Mapping[str, Tensor],
    model: Mapping[str, Tensor],
    spec: TowerSpec,
    maps: Mapping[str, Tensor],
    group: str,
) -> Tensor:
    """(n_model, n_anchor): Σ over the group's tensors of ⟨model neuron i, anchor neuron j⟩, the
    model's other axes already mapped by ``maps`` (all groups but this one)."""
    uses = groups(spec)[group]
    keys = {u.key for u in uses}
    others = {g: t for g, t in maps.items() if g != group}
    aligned = apply_maps({k: model[k] for k in keys}, spec, others, keep_chunks=True)
    total = None
    for u in uses:
        s = (
            rows(aligned[u.key], u.axis, u.part).double()
            @ rows(anchor[u.key], u.axis, u.part).double().T
        )
        total = s if total is None else total + s
    return total


def weight_matching(
    anchor: Mapping[str, Tensor],
    model: Mapping[str, Tensor],
    spec: TowerSpec,
    max_iter: int = 100,
    seed: int = 0,
) -> dict[str, Tensor]:
    """{group: permutation (n_model, n_anchor)} mapping ``model`` onto ``anchor`` (same spec)."""
    maps = {g: torch.eye(group_size(spec, g), dtype=torch.float64) for g in groups(spec)}
    todo = units(spec)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(max_iter):
        progress = False
        for i in torch.randperm(len(todo), generator=gen).tolist():
            unit = todo[i]
            sims = [similarity(anchor, model, spec, maps, g) for g in unit]
            old = sum(float((s * maps[g]).sum()) for s, g in zip(sims, unit, strict=True))
            new = assign_unit(unit, [-s for s in sims], spec.heads)
            gain = sum(float((s * new[g]).sum()) for s, g in zip(sims, unit, strict=True)) - old
            if gain > 1e-12 * max(1.0, abs(old)):  # relative: ties do not loop to max_iter
                progress = True
                maps.update(new)
        if not progress:
            break
    return maps


@dataclass(frozen=True)
class WeightMatching(DataMerge):
    anchor: str | None = None  # whose neuron order the fused model keeps (default: the first)
    max_iter: int = 100  # coordinate-descent sweeps at most (Git Re-Basin: 100)
    seed: int = 0  # the random group order of each sweep
    finetune_steps: int = 0
    finetune_lr: float = 1e-4
    finetune_batch_size: int = 64

    def __post_init__(self):
        if self.max_iter < 1:
            raise FusionBenchError(f"method.max_iter={self.max_iter}: give at least 1 sweep.")

    def models_held(self, n_experts: int) -> float:
        return held(n_experts, self.finetune_steps)

    def merge(self, pool, data, context: Context):
        from tqdm.auto import tqdm

        members = load_members(pool, self.anchor, "fusion/weight_matching")
        require_equal_shapes(members, "fusion/weight_matching")
        anchor = members.states[members.anchor]
        maps = {
            n: weight_matching(
                anchor, members.states[n], members.specs[n], self.max_iter, self.seed
            )
            for n in tqdm(members.others, desc="weight matching", leave=False)
        }
        fused = fuse(members, maps)
        del members  # the K models are not needed while fine-tuning
        return finish(self, pool, fused, data, context)
