"""LoRA merging: methods that merge LoRA experts from their factors (kind ``lora_merge``).

Every expert of a LoRA pool (:mod:`fusion_bench.modelpool.lora`) changes some 2-D weights by
ΔW_t = B_t A_t (the scaling folded into B_t; :class:`fusion_bench.lora.LowRank`). These methods
never build the T full matrices: they work in a basis of the factors (Core Space: the stacked
A's and B's; KnOTS: the SVD of the concatenated updates), run a merge rule of ``conf/method/``
there, and map the result back. Weights no adapter touches stay pretrained.

- :mod:`~fusion_bench.method.lora.core_space` — Core Space (Panariello et al., NeurIPS 2025)
- :mod:`~fusion_bench.method.lora.knots` — KnOTS (Stoica et al., ICLR 2025)

Any other method of ``conf/method/`` runs on a LoRA pool too, on the expanded experts: that is
the full-space baseline the LoRA methods are compared with (docs/methods/lora.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from fusion_bench.errors import FusionBenchError
from fusion_bench.lora import LowRank
from fusion_bench.method.base import Adapters, Progress
from fusion_bench.tensor_ops import StateDict, map_keys


def adapted_keys(pretrained: StateDict, adapters: Adapters) -> list[str]:
    """The keys some adapter changes, in the pretrained model's order (checked to exist)."""
    keys = {key for adapter in adapters.values() for key in adapter}
    unknown = sorted(keys - set(pretrained))
    if unknown:
        raise FusionBenchError(
            f"LoRA factors for '{unknown[0]}', which the pretrained model lacks: the adapters "
            "belong to another base model."
        )
    return [key for key in pretrained if key in keys]


def factors(adapters: Adapters, key: str) -> list[LowRank | None]:
    """Each expert's factors of ``key`` (None: that expert leaves it pretrained), float64."""
    out = []
    for adapter in adapters.values():
        if key in adapter:
            f = adapter[key]
            out.append(LowRank(B=f.B.to(torch.float64), A=f.A.to(torch.float64)))
        else:
            out.append(None)
    return out


def with_updates(
    pretrained: StateDict,
    keys: Iterable[str],
    update: Callable[[str, Tensor], Tensor],
    progress: Progress = None,
) -> dict[str, Tensor]:
    """The merged model: θ0 + ``update(key, θ0)`` (a float64 ΔW) on ``keys``, a copy of θ0
    elsewhere, built by :func:`fusion_bench.tensor_ops.map_keys` (float32 like every merged
    model, integer buffers as stored)."""
    changed = set(keys)

    def merge_key(key: str, base: Tensor) -> Tensor:
        if key not in changed:
            return base.clone()
        return (base.to(torch.float64) + update(key, base)).to(torch.float32)

    return map_keys(pretrained, merge_key, progress=progress)
