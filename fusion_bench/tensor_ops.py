"""Shared tensor operations on state dicts: the one place merge maths is built from.

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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

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
    a copy of the pretrained tensor for the rest."""
    keys: Iterable[str] = list(pretrained)
    if progress is not None:
        keys = progress(keys)
    out: dict[str, Tensor] = {}
    for key in keys:
        base = pretrained[key]
        if base.is_floating_point() and not is_excluded(key, exclude):
            out[key] = fn(key, base.to(torch.float32))
        else:
            out[key] = base.clone()
    return out


def add_weighted_task_vectors(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    weights: Sequence[float],
    names: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    progress: Callable[[Iterable[str]], Iterable[str]] | None = None,
) -> dict[str, Tensor]:
    """θ0 + Σ_i w_i (θ_i − θ0), streamed key by key and expert by expert.

    Task arithmetic is ``w_i = λ``; the simple average is ``w_i = 1/N``; a normalised weighted
    average is ``w_i = c_i / Σc``. Holding one running sum per key, memory is independent of N.
    """
    if len(finetuned) != len(weights):
        raise ValueError(f"{len(finetuned)} experts but {len(weights)} weights")
    names = list(names) if names is not None else [f"#{i}" for i in range(len(finetuned))]

    def merge_key(key: str, base: Tensor) -> Tensor:
        acc = base.clone()
        for expert, w, name in zip(finetuned, weights, names, strict=True):
            if w != 0.0:
                acc.add_(expert_tensor(expert, key, base, name) - base, alpha=float(w))
        return acc

    return map_keys(pretrained, merge_key, exclude, progress)


def task_vector(pretrained: StateDict, finetuned: StateDict, exclude: Sequence[str] = ()) -> dict[str, Tensor]:
    """τ = θ_ft − θ0 over the mergeable keys (float32). Materialises one model's worth of tensors:
    for algorithms that need whole task vectors at once, not for streaming merges."""
    return {
        key: expert_tensor(finetuned, key, pretrained[key], "finetuned") - pretrained[key].float()
        for key in mergeable_keys(pretrained, exclude)
    }


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
