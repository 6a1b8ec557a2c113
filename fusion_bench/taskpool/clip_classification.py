"""CLIP zero-shot image classification task pool: per-task accuracy and loss of a model.

For each task: build (or load from the on-disk cache) the zero-shot head from the task's class
names × templates with the pool's pretrained text tower, then classify the task's images with the
evaluated image tower. Datasets are read with ``datasets.load_dataset`` whether they are hub ids
(``tanganke/<task>``) or local directories, so tests exercise the same path as real runs.

Splits: ``test`` and ``validation``. Tasks without a validation split get one carved out of the
training split (a seeded ``validation_fraction`` of it, at most ``validation_max`` images), so that
coefficient selection never looks at test data.

Run: ``fusion_bench taskpool=clip_classification suite=ta8 taskpool.splits=[validation,test]``
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping

import torch

from fusion_bench.errors import FusionBenchError
from fusion_bench.modelpool.base import ZeroShotClassifier
from fusion_bench.taskpool.data import TaskData

log = logging.getLogger(__name__)
SPLITS = ("test", "validation")
# fast_dev_run evaluates one batch of at most this many images per task and split: a smoke test
# of the whole job, not a measurement (a full batch of 128 tiny8 images costs ~0.4 s per task).
FAST_DEV_RUN_BATCH = 16


class CLIPClassificationTaskPool:
    """Evaluates a zero-shot classifier (or one classifier per task) on a list of tasks."""

    def __init__(
        self,
        tasks: list[str],
        splits: list[str] | None = None,  # default: ["test"]
        batch_size: int = 128,
        num_workers: int = 0,
        max_samples_per_task: int | None = None,
        fast_dev_run: bool = False,
        datasets: dict[str, str] | None = None,
        validation_fraction: float = 0.1,
        validation_max: int = 5000,
        cache_heads: bool = True,
        seed: int = 0,
    ):
        if not tasks:
            raise FusionBenchError(
                "taskpool.tasks is empty: set `suite=...` or `taskpool.tasks=[...]`."
            )
        splits = list(splits or ["test"])
        for split in splits:
            if split not in SPLITS:
                raise FusionBenchError(
                    f"Unknown split '{split}' in taskpool.splits; use any of {list(SPLITS)}."
                )
        for name in tasks:
            TaskData.spec(name)  # an unknown task fails here, before anything is loaded
        self.tasks = list(tasks)
        self.splits = list(splits)
        self.batch_size = batch_size
        self.max_samples_per_task = max_samples_per_task
        self.fast_dev_run = fast_dev_run
        # The data half, shared with the methods that use data (the runner hands it to them).
        self.data = TaskData(
            datasets, num_workers, validation_fraction, validation_max, cache_heads, seed
        )

    # -- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(
        self,
        model: ZeroShotClassifier | Mapping[str, ZeroShotClassifier],
        fabric=None,
        tasks: list[str] | None = None,
        splits: list[str] | None = None,
    ) -> dict[str, float]:
        """Metrics ``<split>/<task>/acc``, ``<split>/<task>/loss`` and ``<split>/avg_acc``.

        ``model`` is one classifier for all tasks, or a mapping task -> classifier (e.g. each
        expert on its own task). ``tasks`` / ``splits``: subsets of the pool's (default: all)."""
        from tqdm.auto import tqdm

        device = fabric.device if fabric is not None else torch.device("cpu")
        metrics: dict[str, float] = {}
        for split in self.splits if splits is None else splits:
            accs = []
            for task in self.tasks if tasks is None else tasks:
                classifier = self._classifier_for(model, task)
                classifier.encoder.to(device).eval()
                spec = self.data.spec(task)
                head = self.data.zero_shot_head(classifier, task, device)
                ds = self.data.load_split(task, split, self.max_samples_per_task)
                correct, total, loss_sum = 0, 0, 0.0
                batch_size = (
                    min(self.batch_size, FAST_DEV_RUN_BATCH)
                    if self.fast_dev_run
                    else self.batch_size
                )
                batches = self.data.loader(ds, task, classifier.preprocess, batch_size)
                n_batches = 1 if self.fast_dev_run else len(batches)
                for i, (images, labels) in enumerate(
                    tqdm(batches, total=n_batches, desc=f"{split}/{task}", leave=False)
                ):
                    if i >= n_batches:
                        break
                    images, labels = images.to(device), labels.to(device)
                    if labels.max() >= spec.num_classes or labels.min() < 0:
                        raise FusionBenchError(
                            f"Task '{task}': dataset label {int(labels.max())} is outside the "
                            f"{spec.num_classes} class names of the spec; the dataset and the "
                            "task spec do not match."
                        )
                    autocast = fabric.autocast() if fabric is not None else contextlib.nullcontext()
                    with autocast:
                        logits = classifier.logits(images, head.to(images.dtype)).float()
                    loss_sum += torch.nn.functional.cross_entropy(
                        logits, labels, reduction="sum"
                    ).item()
                    correct += (logits.argmax(dim=-1) == labels).sum().item()
                    total += labels.numel()
                if total == 0:
                    raise FusionBenchError(f"Task '{task}' has no {split} images to evaluate.")
                metrics[f"{split}/{task}/acc"] = correct / total
                metrics[f"{split}/{task}/loss"] = loss_sum / total
                accs.append(correct / total)
                log.info("%s/%s: acc %.4f (%d images)", split, task, correct / total, total)
            metrics[f"{split}/avg_acc"] = sum(accs) / len(accs)
        return metrics

    def _classifier_for(self, model, task: str) -> ZeroShotClassifier:
        if isinstance(model, ZeroShotClassifier):
            return model
        if task not in model:
            raise FusionBenchError(
                f"The method produced per-task models for {sorted(model)} but not for task "
                f"'{task}'. Evaluate only those tasks (taskpool.tasks) or add the expert."
            )
        return model[task]

    def describe(self) -> dict:
        return {"tasks": self.tasks, "splits": self.splits}
