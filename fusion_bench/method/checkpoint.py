"""Evaluate one saved or external checkpoint (FusionBench users know it as ``method=dummy``):
the image tower at ``path`` replaces the pool's experts; the pool's pretrained CLIP gives the text
tower, the zero-shot heads and the preprocessing.

``path`` is a file (safetensors, or a torch state dict) or a directory (a ``save_pretrained``
``CLIPVisionModel``/``CLIPModel``, e.g. a merge saved with ``merged_model_save_path``, or an
open_clip merge directory holding ``model.safetensors``); any supported key layout is recognised
and checked against the pool's architecture before anything is evaluated.

Run: ``fusion_bench method=checkpoint method.path=outputs/merged modelpool=clip_vision_b32 suite=ta8``
Memory: the checkpoint, read lazily by the evaluator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import Experts, Progress, StateDictMerge
from fusion_bench.tensor_ops import StateDict, check_same_architecture


@dataclass(frozen=True)
class Checkpoint(StateDictMerge):
    path: str | None = None  # the checkpoint to evaluate (file or directory)
    needs_experts: ClassVar[bool] = False  # the pool's experts are not used

    def merge(self, pretrained: StateDict, experts: Experts, progress: Progress = None):
        if not self.path:
            raise FusionBenchError(
                "method=checkpoint needs method.path: the checkpoint file or directory to "
                "evaluate (e.g. a merge saved with merged_model_save_path)."
            )
        from fusion_bench.api import load

        state = load(self.path, "checkpoint")
        check_same_architecture(pretrained, state, f"checkpoint {self.path}")
        return state

    def models_held(self, n_experts: int) -> float:
        return 0.0
