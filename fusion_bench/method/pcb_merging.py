"""PCB-Merging (Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024), as
the authors' released ``PCB_merge`` (github.com/duguodong7/pcb-merging, ``pcb-merging.py``) computes
it, over the whole model flattened (one vector per task, as their code flattens the state dict):

1. Outlier clamp, per task: a_i = clamp(|τ_i|, lo_i, hi_i), lo_i / hi_i the values at 0-based
   ranks ⌊D·c⌋ and ⌊D·(1 − c) − 1⌋ of |τ_i| sorted (c = ``clip_ratio``, D the number of entries);
   τ̃_i = sign(τ_i) · a_i.
2. Intra-balancing (within a task): exp(N · ((a_i − lo_i) / (hi_i − lo_i))²). The paper writes a
   softmax over the entries; the code drops its normaliser, a per-task constant that step 5's
   per-task min–max normalisation cancels.
3. Inter-balancing (across tasks): tanh(τ_i ⊙ Σ_j τ_j) (raw, unclamped task vectors).
4. Score b_i = intra ⊙ inter.
5. Drop and rescale: q_i = the value at 0-based rank ⌊D·(1 − r)⌋ of b_i sorted (r = ``pcb_ratio``,
   the share of each task's entries KEPT), M_i = max b_i; s_i = (max(b_i, q_i) − q_i) / (M_i − q_i),
   so entries scoring at most q_i get 0 and the top scorer 1.
6. τ_m = Σ_i λ_i τ̃_i ⊙ s_i / max(Σ_i s_i, 1e-12) (the authors' per-task ``lams`` multiply τ̃_i);
   θ = θ0 + τ_m.

Where a normalisation has max = min (every clamped |τ_i|, or every clamped score of a task,
equal; e.g. a task vector that is exactly 0) the reference divides 0 by 0 and returns NaN; here
that normalised quantity is 1 everywhere: with equal scores every task gets weight 1 and the merge
is θ0 + Σ_i λ_i τ̃_i / N, the average the paper's rescaling gives for equal scores.

Streaming, exact: the per-task ranks are global, so they are found by the streaming radix selection
of ``tensor_ops.kth_smallest_magnitudes`` (the TIES threshold machinery): two passes for lo_i and
hi_i on |τ_i|; one pass counting each task's negative scores and its maximum M_i; two passes
selecting q_i among the magnitudes of the negative scores or of the non-negative ones (whichever
holds rank ⌊D(1 − r)⌋ + 1); one pass that merges. Scores are recomputed in every pass, key by key,
from Σ_j τ_j of that key and one τ_i at a time (each pass reads every expert twice: once for the
sum, once for the scores). Memory: the output + O(1) tensors of one key + the selection's 2¹⁶-bucket
int64 histograms, 0.5 MiB per task and rank (1 MiB per task while lo_i, hi_i are selected): about
one image tower, tensors of N experts never held together; time: ten reads of every expert and
four evaluations of the scores.

Run: ``fusion_bench method=pcb_merging`` (``method.pcb_ratio=0.1 method.scaling_factor=1.0`` …)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import Experts, Progress, StateDictMerge, per_expert
from fusion_bench.tensor_ops import (
    Scratch,
    StateDict,
    expert_tensor,
    kth_smallest_magnitudes,
    map_keys,
    mergeable_keys,
    task_vector_sum,
)


@dataclass(frozen=True)
class PCBMerging(StateDictMerge):
    scaling_factor: float | list[float] = 1.2  # λ_i: the authors' vision script (pcb.py) uses 1.2
    pcb_ratio: float = 0.05  # r: share of each task's entries kept (authors' scripts: 0.05)
    clip_ratio: float = 1e-4  # c: |τ| clamped to its c and 1 − c quantiles (PCB_merge: 1e-4)
    exclude_keys: list[str] = field(default_factory=list)  # fnmatch patterns kept at θ0

    def __post_init__(self):
        if not 0.0 < self.pcb_ratio <= 1.0:
            raise FusionBenchError(
                f"method.pcb_ratio={self.pcb_ratio}: the share of each task's entries kept (those "
                "of highest balancing score) must be in (0, 1] (the authors use 0.05–0.1)."
            )
        if not 0.0 <= self.clip_ratio < 0.5:
            raise FusionBenchError(
                f"method.clip_ratio={self.clip_ratio}: the share of each task's smallest and of "
                "its largest |τ| clamped must be in [0, 0.5) (the authors use 1e-4 or 0.01)."
            )

    def merge(self, pretrained: StateDict, experts: Experts, progress: Progress = None):
        lambdas = per_expert(self.scaling_factor, list(experts), "scaling_factor")
        keys = list(mergeable_keys(pretrained, self.exclude_keys))
        numel = sum(pretrained[k].numel() for k in keys)
        if numel == 0 or not experts:
            return map_keys(pretrained, lambda key, base: base.clone(), self.exclude_keys)
        walk = progress or (lambda ks: ks)
        scores = BalancingScores(pretrained, experts, keys, walk)
        scores.clamp_bounds(self.clip_ratio, numel)
        thresholds, maxima = scores.drop_thresholds(self.pcb_ratio, numel)
        scratch = Scratch()

        def merge_key(key: str, base: Tensor) -> Tensor:
            total = task_vector_sum(experts, key, base)
            numerator, denominator = torch.zeros_like(base), torch.zeros_like(base)
            work = scratch("work", base.numel(), torch.float32).view(base.shape)
            for i, tau in scores.task_vectors(key, base):
                b, a = scores.of(i, tau, total)
                weight = rescale(b, thresholds[i], maxima[i])  # in place on b
                torch.sign(tau, out=work).mul_(a).mul_(lambdas[i]).mul_(weight)  # λ_i τ̃_i s_i
                numerator += work
                denominator += weight
            return base + numerator / denominator.clamp_(min=1e-12)

        return map_keys(pretrained, merge_key, self.exclude_keys, progress)


class BalancingScores:
    """PCB's per-entry balancing scores b_i, recomputed key by key for each pass, and the global
    per-task constants found by streaming passes (lo_i, hi_i; then q_i, M_i)."""

    def __init__(
        self,
        pretrained: StateDict,
        experts: Experts,
        keys: list[str],
        walk: Callable[[Iterable[str]], Iterable[str]],
    ):
        self.pretrained, self.experts, self.keys, self.walk = pretrained, experts, keys, walk
        self.n = len(experts)
        self.scratch = Scratch()
        self.low: list[Tensor] = []
        self.high: list[Tensor] = []

    def task_vectors(self, key: str, base: Tensor) -> Iterator[tuple[int, Tensor]]:
        """(i, τ_i[key]) one expert at a time, through one reused buffer."""
        tau = self.scratch("tau", base.numel(), torch.float32).view(base.shape)
        for i, (name, expert) in enumerate(self.experts.items()):
            yield i, torch.sub(expert_tensor(expert, key, base, name), base, out=tau)

    def clamp_bounds(self, clip_ratio: float, numel: int) -> None:
        """lo_i, hi_i: the reference's ``sorted(|τ_i|)[⌊D·c⌋]`` and ``[⌊D·(1 − c) − 1⌋]``."""
        low_rank = int(numel * clip_ratio) + 1
        high_rank = int(numel * (1 - clip_ratio) - 1) + 1

        def chunks():  # each τ_i twice: vector 2i for lo_i, 2i + 1 for hi_i
            for key in self.walk(self.keys):
                base = self.pretrained[key].to(torch.float32)
                for i, tau in self.task_vectors(key, base):
                    yield 2 * i, tau
                    yield 2 * i + 1, tau

        bounds = kth_smallest_magnitudes(chunks, [low_rank, high_rank] * self.n)
        # if lo > hi (a tiny model), torch.clamp sets every entry to hi: the same as lo = hi
        self.high = bounds[1::2]
        self.low = [torch.minimum(lo, hi) for lo, hi in zip(bounds[::2], self.high, strict=True)]

    def of(self, i: int, tau: Tensor, total: Tensor) -> tuple[Tensor, Tensor]:
        """(b_i, a_i) for one key: the score exp(N·norm(a_i)²)·tanh(τ_i ⊙ Σ_j τ_j) and the clamped
        magnitudes, in scratch buffers valid until the next call."""
        numel, shape = tau.numel(), tau.shape
        low, high = self.low[i], self.high[i]
        magnitude = self.scratch("magnitude", numel, torch.float32).view(shape)
        torch.abs(tau, out=magnitude).clamp_(low, high)
        score = self.scratch("score", numel, torch.float32).view(shape)
        if high > low:
            torch.sub(magnitude, low, out=score).div_(high - low)  # min–max over the task
        else:
            score.fill_(1.0)  # every clamped |τ_i| equal (the reference: 0/0)
        score.square_().mul_(self.n).exp_()  # intra-balancing
        inter = self.scratch("inter", numel, torch.float32).view(shape)
        score.mul_(torch.mul(tau, total, out=inter).tanh_())  # × inter-balancing
        return score, magnitude

    def scores(self) -> Iterator[tuple[int, Tensor]]:
        """(i, b_i[key]) over all keys, one task at a time."""
        for key in self.walk(self.keys):
            base = self.pretrained[key].to(torch.float32)
            total = task_vector_sum(self.experts, key, base)
            for i, tau in self.task_vectors(key, base):
                yield i, self.of(i, tau, total)[0]

    def drop_thresholds(self, pcb_ratio: float, numel: int) -> tuple[list[Tensor], list[Tensor]]:
        """q_i = the reference's ``sorted(b_i)[⌊D·(1 − r)⌋]`` (the last entry where that index is
        D, which the reference cannot index) and M_i = max b_i, exactly.

        Scores are signed; the radix selection works on magnitudes. One pass counts each task's
        negative scores (n⁻) and finds M_i; rank k = ⌊D(1 − r)⌋ + 1 is then the (n⁻ − k + 1)-th
        smallest magnitude among the negative scores when k ≤ n⁻ (negated), else the (k − n⁻)-th
        smallest among the non-negative ones. The selection sees every entry, those of the other
        sign as +inf (fixed-size chunks: its buffers are reused, not one per chunk size)."""
        rank = min(int(numel * (1 - pcb_ratio)), numel - 1) + 1
        negatives = [0] * self.n
        maxima = [torch.tensor(-torch.inf)] * self.n
        for i, b in self.scores():
            negatives[i] += int(torch.count_nonzero(b < 0))
            maxima[i] = torch.maximum(maxima[i], b.max())
        from_negatives = [rank <= neg for neg in negatives]

        def chunks():  # the other sign's entries become +inf: above every rank asked for
            for i, b in self.scores():
                yield i, b.masked_fill_(b >= 0 if from_negatives[i] else b < 0, torch.inf)

        ranks = [
            neg - rank + 1 if use else rank - neg
            for neg, use in zip(negatives, from_negatives, strict=True)
        ]
        selected = kth_smallest_magnitudes(chunks, ranks)
        thresholds = [-q if use else q for q, use in zip(selected, from_negatives, strict=True)]
        return thresholds, maxima


def rescale(score: Tensor, threshold: Tensor, maximum: Tensor) -> Tensor:
    """PCB's drop and rescale of one task's scores, in place: (max(b, q) − q) / (M − q), i.e. the
    reference's min–max normalisation of the scores clamped below at q (1 everywhere if M = q)."""
    score.clamp_(min=threshold).sub_(threshold)
    if maximum > threshold:
        return score.div_(maximum - threshold)
    return score.fill_(1.0)
