"""Upper baseline ("individual"): each expert evaluated on its own task.

Run: ``fusion_bench method=individual``
Memory: one expert at a time (the evaluator builds each task's model when it reaches that task).
"""

from __future__ import annotations

from dataclasses import dataclass

from fusion_bench.method.base import PerTaskMethod, pool_experts


@dataclass(frozen=True)
class Individual(PerTaskMethod):
    def models(self, pool):
        return pool_experts(pool)
