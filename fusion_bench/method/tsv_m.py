"""TSV-M: Task Singular Vectors Merge (Gargiulo et al., "Task Singular Vectors: Reducing Task
Interference in Model Merging", CVPR 2025).

For every 2-D weight (a "layer task matrix"), with T experts and r = min(m, n):
1. each task matrix τ_t = θ_t − θ0 is compressed to its top k = ⌊r / T⌋ singular triplets
   (U_t, s_t, V_t) (TSV-C);
2. the triplets of all tasks are placed side by side: U = [U_1 … U_T] (m×r), s = [s_1 … s_T],
   V = [V_1; …; V_T] (r×n), zero-padded when T·k < r;
3. interference is removed by replacing U and V by their closest orthogonal matrices
   (the orthogonal polar factors, U⊥ = P Qᵀ for U = P Σ Qᵀ), and Δ = U⊥ diag(s) V⊥.
Tensors that are not 2-D (biases, norms, the patch convolution, the class token) and the 2-D
keys matched by ``average_keys`` (the reference excludes ``text_projection``) get the mean of
the task vectors. θ = θ0 + α Δ.

The top-k triplets and the polar factors come from float64 eigen-decompositions of Gram matrices
(:func:`fusion_bench.tensor_ops.top_singular_triplets`, :func:`~fusion_bench.tensor_ops.polar_factor`):
the same quantities as the reference's ``torch.linalg.svd`` calls (tests check it against a dense
SVD implementation of the paper's equations), cheaper on CPU.

Run: ``fusion_bench method=tsv_m method.scaling_factor=1.0``
Memory: the merged output + for the current key U, s, V (m×r + r×n) and one τ per worker thread:
a few copies of the largest matrix, independent of N. Time: T + 2 eigen-decompositions per 2-D
tensor, spread over torch's threads (:func:`fusion_bench.tensor_ops.parallel_map`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import Experts, Progress, StateDictMerge, require_experts
from fusion_bench.spectral import polar_factor, top_singular_triplets
from fusion_bench.tensor_ops import (
    StateDict,
    expert_tensor,
    is_excluded,
    map_keys,
    parallel_map,
    task_vector_sum,
)


@dataclass(frozen=True)
class TsvM(StateDictMerge):
    scaling_factor: float = 1.0  # α in θ0 + α Δ: Δ at full strength; sweep it on validation
    # 2-D keys averaged instead of compressed (the reference excludes the text projection)
    average_keys: list[str] = field(default_factory=lambda: ["*text_projection*"])
    exclude_keys: list[str] = field(default_factory=list)  # fnmatch patterns kept at θ0

    def merge(self, pretrained: StateDict, experts: Experts, progress: Progress = None):
        names, n_tasks = list(experts), len(experts)
        require_experts(experts, "TSV-M")

        def merge_key(key: str, base: Tensor) -> Tensor:
            if base.dim() != 2 or is_excluded(key, self.average_keys):
                total = task_vector_sum(experts, key, base)
                return base + self.scaling_factor * (total / n_tasks)
            m, n = base.shape
            r = min(m, n)
            k = r // n_tasks
            if k == 0:
                raise FusionBenchError(
                    f"TSV-M keeps ⌊rank / experts⌋ = ⌊{r} / {n_tasks}⌋ = 0 singular vectors per "
                    f"task for '{key}' ({m}×{n}): merge fewer experts, or add '{key}' to "
                    "method.average_keys to average it instead."
                )
            f64 = torch.float64  # stacked and orthogonalised in float64: see spectral.polar_factor
            u_all = torch.zeros(m, r, dtype=f64)
            s_all = torch.zeros(r, dtype=f64)
            v_all = torch.zeros(r, n, dtype=f64)

            def compress(name: str):  # TSV-C of one task: its top-k singular triplets
                tau = expert_tensor(experts[name], key, base, name).to(f64) - base.to(f64)
                return top_singular_triplets(tau, k)

            for t, (u, s, vh) in enumerate(parallel_map(compress, names)):
                u_all[:, t * k : (t + 1) * k] = u
                s_all[t * k : (t + 1) * k] = s
                v_all[t * k : (t + 1) * k] = vh
            (u_orth, _), (v_orth, _) = parallel_map(polar_factor, [u_all, v_all])
            return base + self.scaling_factor * ((u_orth * s_all) @ v_orth).float()

        return map_keys(pretrained, merge_key, self.exclude_keys, progress)
