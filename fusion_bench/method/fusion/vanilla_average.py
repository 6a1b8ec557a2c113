"""Vanilla averaging of independently trained towers: θ = (1/K) Σ_k θ_k, no alignment — the
baseline alignment methods are measured against (it collapses when the models' neurons are in
different orders, as for models trained from different initialisations).

Run: ``fusion_bench modelpool=tiny8_scratch method=fusion/vanilla_average``
Memory: the K models (fp32) and the output.
"""

from __future__ import annotations

from dataclasses import dataclass

from fusion_bench.method.base import Context, DataMerge
from fusion_bench.method.fusion import average, held, load_members
from fusion_bench.method.fusion.finetune import finish


@dataclass(frozen=True)
class VanillaAverage(DataMerge):
    finetune_steps: int = 0  # joint training steps after fusion (0: none)
    finetune_lr: float = 1e-4
    finetune_batch_size: int = 64
    seed: int = 0  # order of the fine-tuning batches

    def models_held(self, n_experts: int) -> float:
        return held(n_experts, self.finetune_steps)

    def merge(self, pool, data, context: Context):
        members = load_members(pool, None, "fusion/vanilla_average")
        fused = average([members.states[n] for n in members.names])
        del members  # the K models are not needed while fine-tuning
        return finish(self, pool, fused, data, context)
