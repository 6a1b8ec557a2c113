"""One model of an independent pool, as it is or after the same short fine-tuning the fused
models get (the "parents" rows of a fusion comparison, and their control for the extra training).

Run: ``fusion_bench modelpool=tiny8_scratch method=fusion/parent method.name=seed1``
Memory: the K models (fp32) and the output.
"""

from __future__ import annotations

from dataclasses import dataclass

from fusion_bench.errors import FusionBenchError, did_you_mean
from fusion_bench.method.base import Context, DataMerge
from fusion_bench.method.fusion.finetune import finish


@dataclass(frozen=True)
class Parent(DataMerge):
    name: str | None = None  # which model (default: the pool's first)
    finetune_steps: int = 0
    finetune_lr: float = 1e-4
    finetune_batch_size: int = 64
    seed: int = 0

    def models_held(self, n_experts: int) -> float:
        return 1.0 if self.finetune_steps <= 0 else 5.0  # + the fine-tuning's tower, grads, AdamW

    def merge(self, pool, data, context: Context):
        names = list(pool.expert_names)
        name = self.name or (names[0] if names else None)
        if name not in names:
            raise FusionBenchError(
                f"method.name '{name}' is not a model of the pool ({names})."
                f"{did_you_mean(str(name), names)}"
            )
        lazy = pool.expert(name)
        state = {k: lazy[k].float() for k in lazy}
        return finish(self, pool, state, data, context)
