"""Continual TIES-Merging (FusionBench's ``ContinualTiesMergingForCLIP``): the merged update and
the new task vector are TIES-merged (trim each to its top ``threshold`` %, elect signs, disjoint
merge) and the result, scaled by λ, is *added* to the merged model:

    θ_1 = θ0 + λ τ_1;   θ_t = θ_{t−1} + λ · TIES(θ_{t−1} − θ0, τ_t)

(with the global thresholds and the disjoint merge of :mod:`fusion_bench.method.ties_merging`).
Order-dependent. Defaults as FusionBench: λ = 0.5, threshold 20, merge_func sum.

Run: ``fusion_bench method=continual/ties_merging``
Memory: θ0 (lazy) + the running update + the step's TIES output (2 image towers) + O(1) tensors of
one key; TIES reads the merged update and the expert three times per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fusion_bench.method.base import Context, SequentialMerge, key_progress
from fusion_bench.method.continual import RunningUpdate
from fusion_bench.method.ties_merging import TiesMerging
from fusion_bench.tensor_ops import StateDict, mergeable_keys


class _MergedModel(dict):
    """θ0 + the running update, built key by key when TIES reads it (no extra copy)."""

    def __init__(self, state: RunningUpdate):
        super().__init__()
        self.state = state

    def __getitem__(self, key: str) -> Tensor:
        base = self.state.pretrained[key]
        update = self.state.update.get(key)
        return base if update is None else base.to(torch.float32) + update

    def __contains__(self, key) -> bool:
        return key in self.state.pretrained

    def __iter__(self):
        return iter(self.state.pretrained)

    def __len__(self) -> int:
        return len(self.state.pretrained)


@dataclass(frozen=True)
class ContinualTiesMerging(SequentialMerge[RunningUpdate]):
    scaling_factor: float = 0.5  # λ (FusionBench's continual default)
    threshold: float = 20  # percent of each task vector kept
    merge_func: str = "sum"  # sum | mean | max
    exclude_keys: list[str] = field(default_factory=list)  # fnmatch patterns kept at θ0

    def __post_init__(self):
        self.ties()  # TIES's own checks (threshold, merge_func) before anything loads

    def ties(self) -> TiesMerging:
        return TiesMerging(1.0, self.threshold, self.merge_func, self.exclude_keys)

    def start(self, pretrained: StateDict, context: Context | None = None) -> RunningUpdate:
        return RunningUpdate(pretrained)

    def absorb(self, state: RunningUpdate, name: str, expert: StateDict) -> RunningUpdate:
        if not state.seen:  # θ_1 = θ0 + λ τ_1

            def combine(key: str, tau: Tensor, previous: Tensor | None) -> Tensor:
                return self.scaling_factor * tau

            state.absorb(name, expert, self.exclude_keys, combine)
            return state
        pre = state.pretrained
        merged = self.ties().merge(
            pre,
            {"merged update so far": _MergedModel(state), name: expert},
            key_progress(f"continual TIES: {name}"),
        )  # θ0 + TIES(merged update, τ_t)
        for key in mergeable_keys(pre, self.exclude_keys):
            base = pre[key].to(torch.float32)
            state.update[key] += self.scaling_factor * (merged.pop(key) - base)
        state.seen.append(name)
        return state

    def merged(self, state: RunningUpdate) -> dict[str, Tensor]:
        return state.model(1.0, self.exclude_keys)

    def models_held(self, n_experts: int) -> float:
        return 3.0  # the running update + the step's TIES output + the model after the step
