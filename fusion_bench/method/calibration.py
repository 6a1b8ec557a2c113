"""Calibration data for the data-using merge methods (Fisher merging, RegMean, RegMean++).

Unlabeled image batches from each task's *training* split, loaded exactly as the evaluator loads
its splits (same task specs, same ``datasets`` overrides, same preprocessing) by reusing
:class:`~fusion_bench.taskpool.clip_classification.CLIPClassificationTaskPool`. Where a task has
no validation split, the evaluator carves validation out of train; calibration uses only the rest,
so coefficient selection on validation stays clean.

A seeded subset of ``num_samples`` images per task (FusionBench uses 256), in fixed order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from fusion_bench.errors import FusionBenchError
from fusion_bench.modelpool.base import ZeroShotClassifier
from fusion_bench.taskpool.clip_classification import CLIPClassificationTaskPool


class CalibrationData:
    """Unlabeled training images and zero-shot heads for the tasks of a model pool."""

    def __init__(
        self,
        tasks: Sequence[str],
        num_samples: int = 256,
        batch_size: int = 32,
        datasets: dict[str, str] | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ):
        if num_samples < 1 or batch_size < 1:
            raise FusionBenchError(
                f"Calibration needs num_samples >= 1 and batch_size >= 1 (got {num_samples}, "
                f"{batch_size}); fix the method's number-of-examples / batch_size settings."
            )
        overrides = {t: d for t, d in (datasets or {}).items() if t in tasks}
        self.num_samples = num_samples
        self._data = CLIPClassificationTaskPool(
            list(tasks),
            batch_size=batch_size,
            num_workers=num_workers,
            max_samples_per_task=num_samples,
            datasets=overrides,
            seed=seed,
        )

    def batches(self, task: str, preprocess) -> Iterator[Tensor]:
        """(B, 3, H, W) CPU batches of ``task``'s training images; labels are never read."""
        ds = self._data.load_split(task, "train")
        for images, _labels in self._data.loader(ds, self._data.specs[task], preprocess):
            yield images

    def head(self, classifier: ZeroShotClassifier, task: str, device) -> Tensor:
        """(D, C) zero-shot head of ``task`` (shared on-disk cache with the evaluator)."""
        return self._data.zero_shot_head(classifier, task, device)


def device_of(fabric) -> torch.device:
    return fabric.device if fabric is not None else torch.device("cpu")
