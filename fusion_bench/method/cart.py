"""CART: Centered Arithmetic with Rank-reduced Task vectors (Choi et al., "Revisiting Weight
Averaging for Model Merging", arXiv:2412.12153, 2024).

Weight averaging is task arithmetic around the average θ̄ = (1/N) Σ_t θ_t: the *centred* task
vectors τ̄_t = θ_t − θ̄ sum to zero. CART keeps only the top-k singular directions of each
centred task matrix and adds them back with a coefficient λ:

    θ = θ̄ + λ Σ_t SVD_k(θ_t − θ̄),   k = max(1, ⌊rank_ratio · min(m, n)⌋)  (0 when rank_ratio = 0).

Both ends are weight averaging: at rank 0 nothing is added, and at full rank Σ_t (θ_t − θ̄) = 0.
As in the authors' code (github.com/JH-GEECS/CART, ``src/merging.py``), only the attention and MLP
weight matrices of the transformer blocks are rank-reduced (``lowrank_keys``); every other tensor
(biases, norms, embeddings) keeps its full centred vectors, which sum to zero: it gets θ̄. The
defaults are their 8-task ViT-B/32 config (``configs/CART/ViT-b-32_8_CART.yaml``: prior λ = 2.0,
initial_rank_ratio 0.12; 14 tasks: 1.5 / 0.16; 20 tasks: 1.9 / 0.32). Their open_clip towers hold
q, k and v as one fused ``in_proj_weight``, rank-reduced as one matrix; on Hugging Face towers
``group_qkv`` does the same with the row-stacked q/k/v_proj weights of a layer.

The truncated SVDs come from the spectral kernel (:func:`fusion_bench.spectral.top_singular_triplets`,
float64, exact for every kept direction), applied to the float64 centred matrices
θ_t − θ̄ = τ_t − (1/N) Σ_s τ_s.

Run: ``fusion_bench method=cart`` (sweep ``method.scaling_factor`` / ``method.rank_ratio`` on
validation data: ``fusion_bench -m method=cart method.scaling_factor=1.5,2.0,2.5``)
Memory: key by key; the mean task vector and the running sum of the low-rank terms of the current
(fused) key in float64, plus one centred matrix and its decomposition per thread: independent of N.
Each expert's tensor is read twice per key (for the mean, then to centre it). Time: one truncated
SVD per expert per block weight (a Gram eigen-decomposition where certified).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import Experts, Progress, StateDictMerge, require_experts
from fusion_bench.spectral import top_singular_triplets
from fusion_bench.tensor_ops import (
    BLOCK_LINEAR_KEYS,
    GroupedKeys,
    StateDict,
    expert_tensor,
    fused_groups,
    is_excluded,
    map_keys,
    parallel_map,
    task_vector_sum,
)


@dataclass(frozen=True)
class Cart(StateDictMerge):
    scaling_factor: float = 2.0  # λ ("prior"): the authors' 8-task ViT-B/32 config
    rank_ratio: float = 0.12  # kept fraction of min(m, n) singular values (authors' 8-task config)
    # fnmatch patterns of the 2-D weights rank-reduced (default: the blocks' attention + MLP weights)
    lowrank_keys: list[str] = field(default_factory=lambda: list(BLOCK_LINEAR_KEYS))
    group_qkv: bool = True  # q/k/v_proj of one attention layer rank-reduced as one fused in_proj
    exclude_keys: list[str] = field(default_factory=list)  # fnmatch patterns kept at θ0

    def __post_init__(self):
        if not 0.0 <= self.rank_ratio <= 1.0:
            raise FusionBenchError(
                f"method.rank_ratio={self.rank_ratio} must be in [0, 1]: it is the fraction of "
                "each centred task matrix's singular values kept (the authors use 0.12 for 8 "
                "tasks; 0 and 1 both give the simple average)."
            )

    def merge(self, pretrained: StateDict, experts: Experts, progress: Progress = None):
        names, n_tasks = list(experts), len(experts)
        require_experts(experts, "CART")
        f64 = torch.float64

        def merge_group(keys: Sequence[str], bases: Sequence[Tensor]) -> list[Tensor]:
            base = torch.cat([b.to(f64) for b in bases])
            mean = torch.cat(
                [task_vector_sum(experts, k, b, f64) for k, b in zip(keys, bases, strict=True)]
            ) / len(names)
            k = kept_rank(self.rank_ratio, min(base.shape))
            merged = base + mean  # θ̄; at k = 0 or full rank, Σ_t SVD_k(θ_t − θ̄) = 0
            if 0 < k < min(base.shape):

                def low_rank(name: str) -> Tensor:  # SVD_k(θ_t − θ̄) of one expert
                    tau = torch.cat(
                        [
                            expert_tensor(experts[name], key, b, name).to(f64) - b.to(f64)
                            for key, b in zip(keys, bases, strict=True)
                        ]
                    )
                    u, s, vh = top_singular_triplets(tau - mean, k)
                    return (u * s) @ vh

                window = max(1, torch.get_num_threads())  # one centred matrix per thread
                total = torch.zeros_like(base)
                for start in range(0, n_tasks, window):
                    for term in parallel_map(low_rank, names[start : start + window]):
                        total += term
                merged += self.scaling_factor * total
            return [part.float() for part in merged.split([b.shape[0] for b in bases])]

        def merge_other(key: str, base: Tensor) -> Tensor:  # full-rank centred vectors: θ̄
            mean = task_vector_sum(experts, key, base, f64) / n_tasks
            return (base.to(f64) + mean).float()

        groups = fused_groups(pretrained, self.rank_reduced, self.group_qkv)
        merge_key = GroupedKeys(pretrained, groups, merge_group, merge_other)
        return map_keys(pretrained, merge_key, self.exclude_keys, progress)

    def rank_reduced(self, key: str, base: Tensor) -> bool:
        return (
            base.dim() == 2
            and is_excluded(key, self.lowrank_keys)
            and not is_excluded(key, self.exclude_keys)
        )


def kept_rank(rank_ratio: float, full: int) -> int:
    """The authors' rule: 0 at ratio 0, all at ratio 1, else max(1, ⌊ratio · min(m, n)⌋)."""
    if rank_ratio <= 0.0:
        return 0
    if rank_ratio >= 1.0:
        return full
    return min(full, max(1, int(rank_ratio * full)))
