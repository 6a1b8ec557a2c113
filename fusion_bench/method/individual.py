"""Upper baseline ("individual"): each expert evaluated on its own task.

Run: ``fusion_bench method=individual``
Memory: one expert at a time (the evaluator builds each task's model when it reaches that task).
"""

from __future__ import annotations

from fusion_bench.method.base import PerTask


class Individual:
    models_held = 0.0

    def run(self, modelpool, fabric=None) -> PerTask:
        return PerTask({name: modelpool.expert(name) for name in modelpool.expert_names})
