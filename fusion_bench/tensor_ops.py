"""Tensor operations that several methods share (a method's own algebra lives in its module).

Every function takes ``Mapping[str, Tensor]`` arguments, which may be plain dicts or lazily read
checkpoints (:class:`fusion_bench.checkpoint.LazyStateDict`). Functions iterate key by key and,
within a key, expert by expert, so with lazy inputs a merge holds the output plus O(1) tensors of
one key at a time, whatever the number of experts.

Conventions:
- Arithmetic is done in float32 whatever the storage dtype; outputs are float32.
- Keys that are not floating point (integer buffers such as position ids) and keys matching an
  ``exclude`` pattern (fnmatch syntax) are copied from the pretrained model, never merged.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from fusion_bench.errors import FusionBenchError

StateDict = Mapping[str, Tensor]


def is_excluded(key: str, exclude: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in exclude)


def mergeable_keys(pretrained: StateDict, exclude: Sequence[str] = ()) -> Iterator[str]:
    """Keys whose tensors a merge changes (floating point and not excluded)."""
    for key in pretrained:
        if not is_excluded(key, exclude) and pretrained[key].is_floating_point():
            yield key


def expert_tensor(expert: StateDict, key: str, like: Tensor, name: str) -> Tensor:
    """``expert[key]`` as float32, with a clear error for a missing key or a shape mismatch."""
    if key not in expert:
        raise FusionBenchError(
            f"Expert '{name}' has no tensor '{key}' that the pretrained model has: it is not a "
            "fine-tuned copy of this architecture. Check the model pool entries."
        )
    t = expert[key]
    if like.is_floating_point() and not t.is_floating_point():
        raise FusionBenchError(
            f"Expert '{name}' stores '{key}' as {t.dtype} where the pretrained model has floating "
            "point: a quantised or corrupted checkpoint cannot be merged as it is. Give the "
            "expert's floating-point weights."
        )
    if t.shape != like.shape:
        raise FusionBenchError(
            f"Expert '{name}' has shape {tuple(t.shape)} for '{key}' but the pretrained model has "
            f"{tuple(like.shape)}: experts must be fine-tuned from the same architecture."
        )
    return t.to(torch.float32)


def map_keys(
    pretrained: StateDict,
    fn: Callable[[str, Tensor], Tensor],
    exclude: Sequence[str] = (),
    progress: Callable[[Iterable[str]], Iterable[str]] | None = None,
) -> dict[str, Tensor]:
    """Build an output state dict key by key: ``fn(key, pretrained_fp32)`` for mergeable keys,
    a copy of the pretrained tensor for the rest: excluded floating keys in float32 like every
    merged key (a half-precision checkpoint's excluded keys are not left in fp16), integer
    buffers as stored."""
    keys: Iterable[str] = list(pretrained)
    if progress is not None:
        keys = progress(keys)
    out: dict[str, Tensor] = {}
    for key in keys:
        base = pretrained[key]
        if base.is_floating_point() and not is_excluded(key, exclude):
            out[key] = fn(key, base.to(torch.float32))
        elif base.is_floating_point():
            out[key] = base.to(torch.float32, copy=True)
        else:
            out[key] = base.clone()
    return out


def add_weighted_task_vectors(
    pretrained: StateDict,
    experts: Mapping[str, StateDict],
    weights: Sequence[float],
    exclude: Sequence[str] = (),
    progress: Callable[[Iterable[str]], Iterable[str]] | None = None,
) -> dict[str, Tensor]:
    """θ0 + Σ_i w_i (θ_i − θ0), streamed key by key and expert by expert.

    Task arithmetic is ``w_i = λ``; the simple average is ``w_i = 1/N``; a normalised weighted
    average is ``w_i = c_i / Σc``. Holding one running sum per key, memory is independent of N.
    """
    if len(experts) != len(weights):
        raise ValueError(f"{len(experts)} experts but {len(weights)} weights")

    def merge_key(key: str, base: Tensor) -> Tensor:
        acc = base.clone()
        tau = torch.empty_like(base)  # one reused buffer per key instead of one per expert
        for (name, expert), w in zip(experts.items(), weights, strict=True):
            if w != 0.0:
                torch.sub(expert_tensor(expert, key, base, name), base, out=tau)
                acc.add_(tau, alpha=float(w))
        return acc

    return map_keys(pretrained, merge_key, exclude, progress)


def task_vector_sum(
    experts: Mapping[str, StateDict], key: str, base: Tensor, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Σ_i (θ_i[key] − θ0[key]) for one key (``base`` = θ0[key] in float32), one expert at a time
    through one reused buffer, accumulated in ``dtype`` (float64: the exact sum of the float32
    differences, for what amplifies rounding, such as an ill-conditioned SVD)."""
    total = torch.zeros_like(base, dtype=dtype)
    tau = torch.empty_like(base, dtype=dtype)
    base = base.to(dtype)
    for name, expert in experts.items():
        total += torch.sub(expert_tensor(expert, key, base, name).to(dtype), base, out=tau)
    return total


def check_same_architecture(reference: Mapping, other: Mapping, name: str) -> None:
    """Compare keys and shapes from checkpoint headers (no tensor is read for lazy mappings)."""
    ref_keys, other_keys = set(reference), set(other)
    missing = sorted(ref_keys - other_keys)
    if missing:
        raise FusionBenchError(
            f"Model '{name}' lacks {len(missing)} tensors of the pretrained model (e.g. "
            f"'{missing[0]}'): it is a different architecture or model family. All experts must be "
            "fine-tuned from the pool's pretrained model."
        )
    extra = sorted(other_keys - ref_keys)
    if extra:  # merging would drop them silently (e.g. an extra transformer block)
        raise FusionBenchError(
            f"Model '{name}' has {len(extra)} tensors the pretrained model lacks (e.g. "
            f"'{extra[0]}'): it is a different (larger) architecture. All experts must be "
            "fine-tuned from the pool's pretrained model."
        )
    shape = getattr(reference, "shape", None)
    other_shape = getattr(other, "shape", None)
    for key in sorted(ref_keys):
        a = shape(key) if shape else tuple(reference[key].shape)
        b = other_shape(key) if other_shape else tuple(other[key].shape)
        if a != b:
            raise FusionBenchError(
                f"Model '{name}' has shape {b} for '{key}' but the pretrained model has {a}: it "
                "was fine-tuned from a different architecture (e.g. ViT-B/16 vs ViT-B/32). Use "
                "experts of one architecture per pool."
            )


# --- Streaming selection: exact k-th magnitudes over a whole model (TIES thresholds, top-k masks) ---

_HALF_BITS = 16
_BUCKETS = 1 << _HALF_BITS


class Scratch:
    """Reusable flat buffers, one per (name, size, dtype). Streaming passes call the same
    elementwise ops on tensors of a handful of shapes thousands of times; writing into reused
    buffers (``out=``) instead of fresh allocations avoids a page fault per page of every
    temporary, which measured as half the time of TIES's threshold passes."""

    def __init__(self):
        self._buffers: dict[tuple[str, int, torch.dtype], Tensor] = {}

    def __call__(self, name: str, numel: int, dtype: torch.dtype) -> Tensor:
        key = (name, numel, dtype)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(numel, dtype=dtype)
        return self._buffers[key]


def _magnitude_bits(t: Tensor, scratch: Scratch) -> Tensor:
    """|t| as int32 bit patterns, flattened, in a scratch buffer. Non-negative IEEE floats order
    like their bit patterns read as integers, so selecting on the bits selects on the magnitudes."""
    flat = t.detach().reshape(-1)
    out = scratch("magnitude", flat.numel(), torch.float32)
    torch.abs(flat.to(torch.float32), out=out)
    return out.view(torch.int32)


def _high_bits(bits: Tensor, scratch: Scratch) -> Tensor:
    return torch.bitwise_right_shift(
        bits, _HALF_BITS, out=scratch("high", bits.numel(), torch.int32)
    )


def _count_into(hist: Tensor, buckets: Tensor) -> None:
    """hist[b] += count of b in ``buckets``. ``index_add_`` in place for small tensors (a fresh
    ``bincount`` histogram per call costs more than their counting); ``bincount`` for large ones,
    where it measured twice as fast (1.2 vs 2.3 ms for 2.4 M entries)."""
    if buckets.numel() >= 1 << 18:
        hist += torch.bincount(buckets, minlength=hist.numel())
    else:
        hist.index_add_(0, buckets, torch.ones(1, dtype=hist.dtype).expand(buckets.numel()))


def _select_bucket(hist: Tensor, rank: int) -> tuple[int, int]:
    """The bucket holding the ``rank``-th smallest entry (1-indexed) and its rank inside it."""
    cumulative = hist.cumsum(0)
    bucket = int(torch.searchsorted(cumulative, rank))  # first bucket with cumulative >= rank
    before = int(cumulative[bucket - 1]) if bucket > 0 else 0
    return bucket, rank - before


def kth_smallest_magnitude(chunks: Callable[[], Iterable[Tensor]], rank: int) -> Tensor:
    """The exact ``rank``-th smallest |x| (1-indexed, like ``torch.kthvalue``) over all entries of
    the tensors that ``chunks()`` yields, as a float32 scalar.

    Streaming radix selection: pass 1 histograms the high 16 bits of every |x| (2^16 buckets) and
    finds the bucket of the target; pass 2 histograms the low 16 bits of the entries in that
    bucket, which pins the exact value. ``chunks`` is called once per pass and must yield the same
    tensors each time; memory is two histograms plus one chunk, never the concatenation.
    """
    (kth,) = kth_smallest_magnitudes(lambda: ((0, t) for t in chunks()), [rank])
    return kth


def kth_smallest_magnitudes(
    chunks: Callable[[], Iterable[tuple[int, Tensor]]], ranks: Sequence[int]
) -> list[Tensor]:
    """:func:`kth_smallest_magnitude` for several vectors at once, in the same two passes.

    ``chunks()`` yields ``(i, tensor)``: a piece of vector ``i``. Interleaving the vectors (e.g.
    key by key, the N task vectors of that key one after the other) lets a caller read what they
    share (θ0) once per key instead of once per vector, still holding one piece at a time.
    """
    n = len(ranks)
    scratch = Scratch()
    high_hists = [torch.zeros(_BUCKETS, dtype=torch.int64) for _ in range(n)]
    for i, t in chunks():
        _count_into(high_hists[i], _high_bits(_magnitude_bits(t, scratch), scratch))
    selected = []
    for hist, rank in zip(high_hists, ranks, strict=True):
        total = int(hist.sum())
        if not 1 <= rank <= total:
            raise ValueError(f"rank {rank} is outside 1..{total}")
        selected.append(_select_bucket(hist, rank))
    del high_hists

    low_hists = [torch.zeros(_BUCKETS, dtype=torch.int64) for _ in range(n)]
    for i, t in chunks():
        bits = _magnitude_bits(t, scratch)
        high = _high_bits(bits, scratch)
        in_bucket = torch.eq(high, selected[i][0], out=scratch("mask", bits.numel(), torch.bool))
        _count_into(low_hists[i], bits[in_bucket] & (_BUCKETS - 1))
    out = []
    for hist, (high, rank_in_bucket) in zip(low_hists, selected, strict=True):
        low, _ = _select_bucket(hist, rank_in_bucket)
        out.append(torch.tensor((high << _HALF_BITS) | low, dtype=torch.int32).view(torch.float32))
    return out


# --- Work spread over cores (the spectral kernel, fusion_bench/spectral.py, runs on it) ---


def parallel_map(fn: Callable, items: Sequence) -> list:
    """``[fn(x) for x in items]`` on as many threads as torch uses, each running torch on one
    thread. For work dominated by LAPACK eigensolvers, which run single-threaded here (see
    :mod:`fusion_bench.spectral`): independent decompositions then use all cores (measured on 2 cores: the
    eigen-decompositions of TSV-M / Iso-C about twice as fast)."""
    threads = torch.get_num_threads()
    workers = min(threads, len(items))
    if workers <= 1:
        return [fn(x) for x in items]

    def run(x):
        torch.set_num_threads(1)  # per worker thread: no nested OpenMP teams
        return fn(x)

    try:
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(run, items))
    finally:
        torch.set_num_threads(threads)


# -- key groups: a layer's q/k/v merged as one matrix (WUDI, CART) ----------------------------
# The attention and MLP weights of the transformer blocks, in both canonical layouts: open_clip
# (attn.in_proj_weight, attn.out_proj.weight, mlp.c_fc.weight, mlp.c_proj.weight) and Hugging Face
# (self_attn.{q,k,v,out}_proj.weight, mlp.fc1.weight, mlp.fc2.weight). The authors' key filter.
BLOCK_LINEAR_KEYS = ("*attn.in_proj_weight", "*attn.*_proj.weight", "*mlp.*.weight")
_QKV = re.compile(r"^(?P<prefix>.*)\.[qkv]_proj\.weight$")


def fused_groups(
    pretrained: StateDict, optimised: Callable[[str, Tensor], bool], group_qkv: bool
) -> dict[str, tuple[str, ...]]:
    """key -> the keys merged together with it: the optimised q/k/v_proj weights of one attention
    layer (Hugging Face layout) when ``group_qkv``, each other optimised key alone. Row-stacking
    the group gives open_clip's fused ``in_proj_weight``, what the authors merged."""
    groups: dict[str, tuple[str, ...]] = {}
    by_prefix: dict[str, list[str]] = {}
    for key in pretrained:
        base = pretrained[key]
        if not base.is_floating_point() or not optimised(key, base):
            continue
        match = _QKV.match(key) if group_qkv else None
        if match:
            by_prefix.setdefault(match["prefix"], []).append(key)
        else:
            groups[key] = (key,)
    for keys in by_prefix.values():
        inputs = {pretrained[k].shape[1] for k in keys}
        members = [(k,) for k in keys] if len(inputs) > 1 else [tuple(keys)] * len(keys)
        groups.update(zip(keys, members, strict=True))
    return groups


class GroupedKeys:
    """A :func:`~fusion_bench.tensor_ops.map_keys` callback: the first key of a group reached merges
    the whole group (``merge_group(keys, θ0 tensors) -> outputs``) and keeps the other outputs
    until their keys come; keys in no group go to ``merge_other(key, θ0 tensor)``."""

    def __init__(
        self,
        pretrained: StateDict,
        groups: dict[str, tuple[str, ...]],
        merge_group: Callable[[Sequence[str], Sequence[Tensor]], list[Tensor]],
        merge_other: Callable[[str, Tensor], Tensor],
    ):
        self.pretrained, self.groups = pretrained, groups
        self.merge_group, self.merge_other = merge_group, merge_other
        self.ready: dict[str, Tensor] = {}

    def __call__(self, key: str, base: Tensor) -> Tensor:
        if key in self.ready:
            return self.ready.pop(key)
        if key not in self.groups:
            return self.merge_other(key, base)
        keys = self.groups[key]
        bases = [base if k == key else self.pretrained[k].to(torch.float32) for k in keys]
        outputs = self.merge_group(keys, bases)
        for k, out in zip(keys, outputs, strict=True):
            if k != key:
                self.ready[k] = out
        return outputs[keys.index(key)]


def streamed_task_vectors(
    pretrained: StateDict, experts: Mapping[str, StateDict], keys: Sequence[str]
) -> Callable[[], Iterator[tuple[int, Tensor]]]:
    """A re-startable stream of ``(expert index, τ)`` over ``keys``, key by key and expert by
    expert, θ0 read once per key: the input of :func:`kth_smallest_magnitudes` (the global
    top-k of TIES, Localize-and-Stitch). τ lives in one reused buffer: use it before the next."""
    scratch = Scratch()

    def task_vectors() -> Iterator[tuple[int, Tensor]]:
        for key in keys:
            base = pretrained[key].to(torch.float32)
            tau = scratch("tau", base.numel(), torch.float32).view(base.shape)
            for i, (name, expert) in enumerate(experts.items()):
                yield i, torch.sub(expert_tensor(expert, key, base, name), base, out=tau)

    return task_vectors
