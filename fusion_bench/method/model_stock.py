"""Model Stock (Jang et al., "Model Stock: All We Need Is Just a Few Fine-Tuned Models",
ECCV 2024).

Per weight tensor (each state-dict key): θ̄ = (1/k) Σ_i θ_i, the angle φ between the task vectors
τ_i = θ_i − θ0 (averaged over all pairs i < j when k > 2) and
    t = k·cos φ / (1 + (k − 1)·cos φ),      θ = t·θ̄ + (1 − t)·θ0.
Like FusionBench and the authors' code: cos φ_ij = <τ_i, τ_j> / (‖τ_i‖‖τ_j‖ + 1e-8), clamped to
[−1, 1]; the pair angles are averaged as angles (not cosines); 1e-8 is added to t's denominator.
A key whose task vectors are all zero gets t = 0 (θ0). The reference ignores text-tower keys only
(position embedding, text projection, logit scale, token embedding, final LayerNorm), which an
image tower does not have, so nothing is skipped by default.

Run: ``fusion_bench method=model_stock``
Memory: the merged output + the k task-vector tensors of the current key (for their Gram matrix).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import Experts, Progress, StateDictMerge
from fusion_bench.tensor_ops import StateDict, expert_tensor, map_keys

EPS = 1e-8  # as the reference code


def interpolation_ratio(taus: Tensor) -> Tensor:
    """t for one key from its stacked, flattened task vectors (k, P)."""
    k = taus.shape[0]
    gram = (taus @ taus.T).double()  # (k, k)
    norms = gram.diagonal().clamp(min=0).sqrt()
    i, j = torch.triu_indices(k, k, offset=1)
    cos = (gram[i, j] / (norms[i] * norms[j] + EPS)).clamp(-1.0, 1.0)
    cos_mean_angle = torch.cos(torch.acos(cos).mean())
    return k * cos_mean_angle / ((k - 1) * cos_mean_angle + 1 + EPS)


@dataclass(frozen=True)
class ModelStock(StateDictMerge):
    exclude_keys: list[str] = field(default_factory=list)  # fnmatch patterns kept at θ0

    def merge(self, pretrained: StateDict, experts: Experts, progress: Progress = None):
        if len(experts) < 2:
            raise FusionBenchError(
                f"Model Stock needs at least 2 fine-tuned models (got {len(experts)}): the "
                "interpolation ratio comes from the angle between them."
            )

        def merge_key(key: str, base: Tensor) -> Tensor:
            taus = torch.stack(
                [(expert_tensor(e, key, base, n) - base).reshape(-1) for n, e in experts.items()]
            )  # (k, P)
            t = interpolation_ratio(taus).item()
            average = base + taus.mean(0).view_as(base)
            return t * average + (1.0 - t) * base

        return map_keys(pretrained, merge_key, self.exclude_keys, progress)

    def models_held(self, n_experts: int) -> float:
        return 1.0  # the output + the k task vectors of the current key
