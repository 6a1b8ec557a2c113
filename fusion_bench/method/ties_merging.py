"""TIES-Merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models",
NeurIPS 2023).

For task vectors τ_i = θ_i − θ0 over the whole model (all mergeable keys flattened into one vector):
1. trim: keep the top-k% magnitudes of each τ_i, with ONE threshold per task over the whole vector
   (the reference code's ``kthvalue`` rank, entries equal to it kept), zero the rest;
2. elect: γ = sign(Σ_i trim(τ_i)) per entry; entries where the sum is 0 get the majority sign
   (the sign of Σ γ over the whole vector);
3. disjoint merge: over the experts whose trimmed entry is non-zero and has sign γ, ``sum`` (the
   FusionBench default) or ``mean`` (the paper);
θ = θ0 + λ · merged.

The global thresholds are exact without holding N × P floats: a streaming radix selection
(:func:`fusion_bench.tensor_ops.kth_smallest_magnitudes`: two passes over the keys, all tasks
together, one τ tensor at a time), then one pass key by key that trims, elects and merges, each
expert read once per key: :class:`fusion_bench.tensor_ops.DisjointMerge` accumulates sums that
do not depend on the elected sign, from which the disjoint sum, mean or max follow exactly. The
memory is the output plus O(1) tensors of one key, independent of N. Entries whose elected sign is 0 but
that have non-zero trimmed values (exact cancellations, rare) are kept aside, sparsely, until the
majority sign is known at the end.

Run: ``fusion_bench method=ties_merging method.scaling_factor=0.3 method.threshold=20``
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fusion_bench.method.base import merge_pool
from fusion_bench.tensor_ops import (
    DisjointMerge,
    Scratch,
    StateDict,
    agrees,
    check_merge_func,
    elect_sign,
    expert_labels,
    expert_tensor,
    kth_smallest_magnitudes,
    majority_sign,
    map_keys,
    mergeable_keys,
    resolve_zero_signs,
    ties_keep_rank,
    trim,
)


def ties_thresholds(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    threshold: float,
    exclude_keys: Sequence[str] = (),
    names: Sequence[str] | None = None,
) -> list[Tensor]:
    """Each task's trim threshold: the exact k-th magnitude of its whole flattened task vector."""
    keys = list(mergeable_keys(pretrained, exclude_keys))
    numel = sum(pretrained[k].numel() for k in keys)
    rank = ties_keep_rank(numel, threshold)
    names = expert_labels(finetuned, names)

    scratch = Scratch()

    def task_vectors():  # key by key, one expert's τ at a time; θ0 read once per key
        for key in keys:
            base = pretrained[key].to(torch.float32)
            tau = scratch("tau", base.numel(), torch.float32).view(base.shape)
            for i, (expert, name) in enumerate(zip(finetuned, names, strict=True)):
                yield i, torch.sub(expert_tensor(expert, key, base, name), base, out=tau)

    return kth_smallest_magnitudes(task_vectors, [rank] * len(finetuned))


def ties_merging(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    scaling_factor: float = 0.3,
    threshold: float = 20,
    merge_func: str = "sum",
    exclude_keys: Sequence[str] = (),
    names: Sequence[str] | None = None,
    progress=None,
) -> dict[str, Tensor]:
    check_merge_func(merge_func)
    names = expert_labels(finetuned, names)
    kth = ties_thresholds(pretrained, finetuned, threshold, exclude_keys, names)
    sign_total = 0.0  # Σ of the elected signs over the whole vector: the majority sign
    undecided: list[tuple[str, Tensor, DisjointMerge]] = []  # (key, flat index, accumulators)
    scratch = Scratch()

    def merge_key(key: str, base: Tensor) -> Tensor:
        nonlocal sign_total
        merger = DisjointMerge(base, merge_func)
        tau = scratch("tau", base.numel(), torch.float32).view(base.shape)
        magnitude = scratch("magnitude", base.numel(), torch.float32).view(base.shape)
        kept = scratch("kept", base.numel(), torch.bool).view(base.shape)
        for expert, name, t in zip(finetuned, names, kth, strict=True):
            torch.sub(expert_tensor(expert, key, base, name), base, out=tau)
            torch.ge(torch.abs(tau, out=magnitude), t, out=kept)
            merger.add(tau.mul_(kept))  # trim(τ, t), in place
        signs = merger.signs()
        sign_total += float(signs.sum(dtype=torch.float64))
        merged = merger.result(signs)
        # Sign 0 with non-zero trimmed values (exact cancellations, rare): decided at the end,
        # once the majority sign is known.
        pending = ((signs == 0) & merger.nonzero_any()).reshape(-1).nonzero().squeeze(1)
        if len(pending):
            merged.reshape(-1)[pending] = 0.0
            undecided.append((key, pending, merger.select(pending)))
        return base + scaling_factor * merged

    out = map_keys(pretrained, merge_key, exclude_keys, progress)
    majority = majority_sign(sign_total)
    for key, pending, part in undecided:
        signs = torch.full((len(pending),), majority)
        out[key].view(-1)[pending] += scaling_factor * part.result(signs)
    return out


def ties_trim_and_elect(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    threshold: float,
    names: Sequence[str] | None = None,
    exclude_keys: Sequence[str] = (),
) -> list[dict[str, Tensor]]:
    """The trimmed task vectors with the entries that disagree with the elected sign zeroed
    (float32, mergeable keys only): what the disjoint merge sums, kept per expert (AdaMerging++
    learns coefficients on them). Holds all N task vectors in memory: N models' worth."""
    names = expert_labels(finetuned, names)
    kth = ties_thresholds(pretrained, finetuned, threshold, exclude_keys, names)
    keys = list(mergeable_keys(pretrained, exclude_keys))
    out: list[dict[str, Tensor]] = [{} for _ in finetuned]
    signs: dict[str, Tensor] = {}
    for key in keys:
        base = pretrained[key].to(torch.float32)
        for i, (expert, name) in enumerate(zip(finetuned, names, strict=True)):
            out[i][key] = trim(expert_tensor(expert, key, base, name) - base, kth[i])
        signs[key] = elect_sign(sum(o[key] for o in out))
    majority = majority_sign(sum(float(s.sum(dtype=torch.float64)) for s in signs.values()))
    for key in keys:
        resolved = resolve_zero_signs(signs[key], majority)
        for o in out:
            o[key] = o[key] * agrees(o[key], resolved)
    return out


class TiesMerging:
    models_held = 1.0  # the output; per key a few tensors of that key, plus two 2^16 histograms

    def __init__(
        self,
        scaling_factor: float = 0.3,
        threshold: float = 20,
        merge_func: str = "sum",
        exclude_keys: list[str] | None = None,
    ):
        check_merge_func(merge_func)
        ties_keep_rank(1, threshold)  # validates the percentage before anything is loaded
        self.scaling_factor = scaling_factor
        self.threshold = threshold
        self.merge_func = merge_func
        self.exclude_keys = list(exclude_keys or [])

    def run(self, modelpool, fabric=None) -> dict[str, Tensor]:
        return merge_pool(
            ties_merging,
            modelpool,
            "ties_merging",
            self.scaling_factor,
            self.threshold,
            self.merge_func,
            self.exclude_keys,
        )
