"""Activation matching (Ainsworth et al., ICLR 2023; the matching step of PLeaS): run every model
on the same unlabelled images and permute each neuron group of a model to the anchor's so that
Σ_i ‖a_i − b_π(i)‖² over all images, tokens and the group's activations is least (equivalently
the inner products Σ ⟨a_i, b_π(i)⟩ are largest: the norms do not depend on π); one linear
assignment per group (SciPy), head-structured for attention as in weight matching. Then average.

Activations of a group (tower.py): the residual stream at the embedding and at every block
boundary; queries and keys together; values; the MLP's pre-GELU hidden units.

Run: ``fusion_bench modelpool=tiny8_scratch method=fusion/activation_matching``
Memory: the K models (fp32), the output, one (n × n) statistic per group and model.
"""

from __future__ import annotations

from dataclasses import dataclass

from fusion_bench.method.base import Context, DataMerge
from fusion_bench.method.fusion import (
    activation_stats,
    check_image_sample,
    fuse,
    held,
    image_batches,
    load_members,
    require_equal_shapes,
    tasks_of,
)
from fusion_bench.method.fusion.align import assign_unit, units
from fusion_bench.method.fusion.finetune import finish


def permutations(stats, spec) -> dict:
    """{group: permutation} of least squared activation distance."""
    out = {}
    for unit in units(spec):
        costs = [stats.distance(g, standardize=False, squared=True) for g in unit]
        out.update(assign_unit(unit, costs, spec.heads))
    return out


@dataclass(frozen=True)
class ActivationMatching(DataMerge):
    anchor: str | None = None
    num_samples: int = 3200  # images, spread over the pool's tasks (PLeaS: 100 batches × 32)
    batch_size: int = 32
    split: str = "train"  # unlabelled images from this split
    seed: int = 0
    finetune_steps: int = 0
    finetune_lr: float = 1e-4
    finetune_batch_size: int = 64

    def __post_init__(self):
        check_image_sample(self.num_samples, self.batch_size, self.split)

    def models_held(self, n_experts: int) -> float:
        return held(n_experts, self.finetune_steps)

    def merge(self, pool, data, context: Context):
        members = load_members(pool, self.anchor, "fusion/activation_matching")
        require_equal_shapes(members, "fusion/activation_matching")
        tasks = tasks_of(pool, "fusion/activation_matching")
        n = self.batch_size if context.fast_dev_run else self.num_samples
        batches = image_batches(pool, data, tasks, self.split, n, self.batch_size, self.seed)
        stats = activation_stats(members, batches, context.device, "activation matching")
        maps = {name: permutations(stats[name], members.specs[name]) for name in members.others}
        fused = fuse(members, maps)
        del members  # the K models are not needed while fine-tuning
        return finish(self, pool, fused, data, context, tasks)
