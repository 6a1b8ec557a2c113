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
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import Experts, Progress, StateDictMerge
from fusion_bench.tensor_ops import (
    Scratch,
    StateDict,
    expert_tensor,
    kth_smallest_magnitudes,
    map_keys,
    mergeable_keys,
    streamed_task_vectors,
)


@dataclass(frozen=True)
class TiesMerging(StateDictMerge):
    scaling_factor: float = 0.3  # λ (FusionBench's CLIP default with merge_func=sum)
    threshold: float = 20  # percent of each task vector kept (the paper's k = 20 %)
    merge_func: str = "sum"  # sum (FusionBench) | mean (the paper) | max
    exclude_keys: list[str] = field(default_factory=list)  # fnmatch patterns kept at θ0

    def __post_init__(self):
        check_merge_func(self.merge_func)
        ties_keep_rank(1, self.threshold)  # validates the percentage before anything is loaded

    def merge(self, pretrained: StateDict, experts: Experts, progress: Progress = None):
        kth = ties_thresholds(pretrained, experts, self.threshold, self.exclude_keys)
        sign_total = 0.0  # Σ of the elected signs over the whole vector: the majority sign
        undecided: list[tuple[str, Tensor, DisjointMerge]] = []  # (key, flat index, accumulators)
        scratch = Scratch()

        def merge_key(key: str, base: Tensor) -> Tensor:
            nonlocal sign_total
            merger = DisjointMerge(base, self.merge_func)
            tau = scratch("tau", base.numel(), torch.float32).view(base.shape)
            magnitude = scratch("magnitude", base.numel(), torch.float32).view(base.shape)
            kept = scratch("kept", base.numel(), torch.bool).view(base.shape)
            for (name, expert), t in zip(experts.items(), kth, strict=True):
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
            return base + self.scaling_factor * merged

        out = map_keys(pretrained, merge_key, self.exclude_keys, progress)
        majority = majority_sign(sign_total)
        for key, pending, part in undecided:
            signs = torch.full((len(pending),), majority)
            out[key].view(-1)[pending] += self.scaling_factor * part.result(signs)
        return out


def ties_thresholds(
    pretrained: StateDict, experts: Experts, threshold: float, exclude_keys: Sequence[str] = ()
) -> list[Tensor]:
    """Each task's trim threshold: the exact k-th magnitude of its whole flattened task vector."""
    keys = list(mergeable_keys(pretrained, exclude_keys))
    numel = sum(pretrained[k].numel() for k in keys)
    rank = ties_keep_rank(numel, threshold)
    task_vectors = streamed_task_vectors(pretrained, experts, keys)

    return kth_smallest_magnitudes(task_vectors, [rank] * len(experts))


def ties_trim_and_elect(
    pretrained: StateDict, experts: Experts, threshold: float, exclude_keys: Sequence[str] = ()
) -> list[dict[str, Tensor]]:
    """The trimmed task vectors with the entries that disagree with the elected sign zeroed
    (float32, mergeable keys only): what the disjoint merge sums, kept per expert (AdaMerging++
    learns coefficients on them). Holds all N task vectors in memory: N models' worth."""
    kth = ties_thresholds(pretrained, experts, threshold, exclude_keys)
    keys = list(mergeable_keys(pretrained, exclude_keys))
    out: list[dict[str, Tensor]] = [{} for _ in experts]
    signs: dict[str, Tensor] = {}
    for key in keys:
        base = pretrained[key].to(torch.float32)
        for i, (name, expert) in enumerate(experts.items()):
            out[i][key] = trim(expert_tensor(expert, key, base, name) - base, kth[i])
        signs[key] = elect_sign(sum(o[key] for o in out))
    majority = majority_sign(sum(float(s.sum(dtype=torch.float64)) for s in signs.values()))
    for key in keys:
        resolved = resolve_zero_signs(signs[key], majority)
        for o in out:
            o[key] = o[key] * agrees(o[key], resolved)
    return out


# -- TIES's algebra: trim, elect, disjoint merge --------------------------------------------------
def ties_keep_rank(numel: int, threshold: float) -> int:
    """Rank (k-th smallest |τ|) of TIES's trim threshold for a task vector of ``numel`` entries
    and ``threshold`` percent kept. As in the TIES reference code: ``numel − int(numel·k)``, where
    entries with |τ| ≥ that value are kept, i.e. ⌈k·numel⌉ entries when k·numel is not an integer
    and k·numel + 1 when it is (with distinct magnitudes). Clamped to 1 so that 100% keeps all
    (the reference code fails there)."""
    if not 0.0 <= threshold <= 100.0:
        raise FusionBenchError(
            f"TIES threshold {threshold} is not a percentage: give the share of each task vector "
            "to keep in percent, in [0, 100] (the paper's default is 20)."
        )
    return max(1, numel - int(numel * (threshold / 100)))


def trim(tau: Tensor, kth_magnitude: Tensor) -> Tensor:
    """TIES trim: zero the entries with |τ| below the task's threshold (ties with it are kept)."""
    return tau * (tau.abs() >= kth_magnitude)


def elect_sign(trimmed_sum: Tensor) -> Tensor:
    """TIES sign election: the sign of Σ_i trim(τ_i), per entry. Entries where that sum is 0 get
    sign 0 here; :func:`resolve_zero_signs` gives them the majority sign of the whole vector."""
    return torch.sign(trimmed_sum)


def majority_sign(sign_sum: float) -> float:
    """The reference's majority sign: the sign of the sum of all elected signs (whole vector)."""
    return float((sign_sum > 0) - (sign_sum < 0))


def resolve_zero_signs(signs: Tensor, majority: float) -> Tensor:
    return torch.where(signs == 0, torch.full_like(signs, majority), signs)


def agrees(trimmed: Tensor, signs: Tensor) -> Tensor:
    """Entries of ``trimmed`` kept by the disjoint merge: non-zero and of the elected sign. As in
    the reference, a sign that is not positive selects the negative entries."""
    return torch.where(signs > 0, trimmed > 0, trimmed < 0)


MERGE_FUNCS = ("sum", "mean", "max")


def check_merge_func(merge_func: str) -> None:
    if merge_func not in MERGE_FUNCS:
        raise FusionBenchError(
            f"merge_func '{merge_func}' is not one of {list(MERGE_FUNCS)} (the TIES paper uses "
            "'mean', FusionBench defaults to 'sum')."
        )


class DisjointMerge:
    """TIES election and disjoint merge in ONE pass over the experts (memory independent of N).

    ``add`` accumulates per entry what both steps need: S = Σ_i t_i (its sign is the elected sign
    γ, :meth:`signs`), and for the disjoint merge, with ``g`` = +1 where the resolved sign is
    positive and −1 elsewhere (the reference: a sign that is not positive selects the negative
    entries), the agreeing part A of the entries follows from sums that do not depend on γ:

    - ``sum`` (FusionBench's default): A = (S + g·Σ|t_i|) / 2, since S = g(A − D) and
      Σ|t_i| = A + D (D: the disagreeing magnitudes). As γ = sign(S) gives A ≥ D, the rounding
      error is a few ulps of A: no cancellation.
    - ``mean`` (the paper): A / max(1, c) with c = (#non-zero + g·Σ sign t_i) / 2 agreeing experts.
    - ``max``: the largest agreeing magnitude times the sign: the running max of t (g = +1) or of
      −t (g = −1).
    """

    def __init__(self, like: Tensor, merge_func: str):
        check_merge_func(merge_func)
        self.merge_func = merge_func
        self.total = torch.zeros_like(like)  # S
        self._work = torch.empty_like(like)  # scratch of add(): no allocation per expert
        if merge_func == "max":
            self.pos = torch.zeros_like(like)
            self.neg = torch.zeros_like(like)
        else:
            self.abs_total = torch.zeros_like(like)
        if merge_func == "mean":
            self.nonzero = torch.zeros_like(like)
            self.sign_total = torch.zeros_like(like)

    def add(self, trimmed: Tensor) -> None:
        self.total += trimmed
        work = self._work
        if self.merge_func == "max":
            torch.maximum(self.pos, trimmed, out=self.pos)
            torch.maximum(self.neg, torch.neg(trimmed, out=work), out=self.neg)
            return
        self.abs_total += torch.abs(trimmed, out=work)
        if self.merge_func == "mean":
            self.sign_total += torch.sign(trimmed, out=work)
            self.nonzero += torch.abs(work, out=work)

    def signs(self) -> Tensor:
        """The elected signs (0 where S is exactly 0: see :func:`resolve_zero_signs`)."""
        return elect_sign(self.total)

    def nonzero_any(self) -> Tensor:
        """Where at least one added tensor was non-zero."""
        if self.merge_func == "max":
            return (self.pos != 0) | (self.neg != 0)
        return self.abs_total != 0

    def result(self, signs: Tensor) -> Tensor:
        """The disjoint merge for the resolved ``signs``."""
        if self.merge_func == "max":
            return torch.where(signs > 0, self.pos, -self.neg) * signs.abs()
        g = torch.where(signs > 0, 1.0, -1.0).to(self.total.dtype)
        agreeing = (self.total + g * self.abs_total) / 2
        if self.merge_func == "mean":
            count = (self.nonzero + g * self.sign_total) / 2
            return agreeing / count.clamp(min=1)
        return agreeing

    def select(self, index: Tensor) -> DisjointMerge:
        """The accumulators at the flat positions ``index`` only (kept aside, small, for entries
        whose sign is decided at the end)."""
        part = DisjointMerge.__new__(DisjointMerge)
        part.merge_func = self.merge_func
        for name, value in vars(self).items():
            if isinstance(value, Tensor) and name != "_work":
                setattr(part, name, value.reshape(-1)[index])
        return part
