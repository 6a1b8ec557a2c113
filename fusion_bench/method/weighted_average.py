"""Weighted average of the experts: θ = Σ_i w_i θ_i, with w_i = c_i / Σ_j c_j when ``normalize``.

As FusionBench's weighted average: with ``normalize: false`` the weights are used as given, so
when they do not sum to 1 the result is a scaled sum of the models (θ0 is scaled too). For
θ0 + Σ_i λ_i τ_i use ``task_arithmetic`` with one λ per expert. ``weights`` is a list in the pool's
expert order or a mapping {expert name: weight}. Computed as θ0 + Σ_i w_i (θ_i − θ0)
+ (Σ_i w_i − 1) θ0, streamed key by key; equal weights give exactly ``simple_average``.

Run: ``fusion_bench method=weighted_average 'method.weights=[0.5,0.3,0.2]'``
Memory: the merged output + one running sum and one expert tensor of the current key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import Experts, Progress, StateDictMerge
from fusion_bench.tensor_ops import StateDict, add_weighted_task_vectors, mergeable_keys


@dataclass(frozen=True)
class WeightedAverage(StateDictMerge):
    weights: list[float] | dict[str, float] | None = None  # required: list or {expert: weight}
    normalize: bool = True  # divide by Σ w (FusionBench's default)
    exclude_keys: list[str] = field(default_factory=list)  # fnmatch patterns kept at θ0

    def merge(self, pretrained: StateDict, experts: Experts, progress: Progress = None):
        weights = weights_in_order(self.weights, list(experts))
        if len(weights) != len(experts):
            raise FusionBenchError(
                f"weights has {len(weights)} values for {len(experts)} experts: give one weight "
                "per expert, in the pool's order (or a mapping {expert: weight})."
            )
        total = sum(weights)
        if self.normalize:
            if total == 0.0:
                raise FusionBenchError(
                    "weights sum to 0 and cannot be normalised; fix method.weights."
                )
            weights = [w / total for w in weights]
        out = add_weighted_task_vectors(pretrained, experts, weights, self.exclude_keys, progress)
        if not self.normalize and total != 1.0:  # Σ w_i θ_i = θ0 + Σ w_i τ_i + (Σ w_i − 1) θ0
            for key in mergeable_keys(pretrained, self.exclude_keys):
                out[key].add_(pretrained[key].to(torch.float32), alpha=total - 1.0)
        return out


def weights_in_order(
    weights: Sequence[float] | Mapping[str, float] | None, names: Sequence[str]
) -> list[float]:
    """A weight per expert in ``names`` order, from a list or a {name: weight} mapping."""
    if weights is None:
        raise FusionBenchError(
            f"weighted_average needs method.weights: one weight per expert {list(names)}, as a "
            "list in that order or a mapping {expert: weight}."
        )
    if isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(names))
        missing = [n for n in names if n not in weights]
        if unknown or missing:
            problems = [f"names experts not in the pool {unknown}"] if unknown else []
            problems += [f"has no weight for {missing}"] if missing else []
            raise FusionBenchError(
                f"method.weights {' and '.join(problems)}: give exactly one weight per expert of "
                f"the pool {list(names)} (or restrict the tasks, e.g. suite.tasks=[...])."
            )
        return [float(weights[n]) for n in names]
    return [float(w) for w in weights]
