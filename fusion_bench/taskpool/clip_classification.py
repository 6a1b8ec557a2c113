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
import os
from collections.abc import Mapping

import torch
from torch import Tensor

from fusion_bench.errors import FusionBenchError, did_you_mean
from fusion_bench.modelpool.base import ZeroShotClassifier, cache_key
from fusion_bench.paths import cache_dir
from fusion_bench.taskpool.tasks import TaskSpec, get_task_spec, resolve_dataset_path

log = logging.getLogger(__name__)
SPLITS = ("test", "validation")


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
        self.specs = {name: get_task_spec(name) for name in tasks}  # fails early on a typo
        self.tasks = list(tasks)
        self.splits = list(splits)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_samples_per_task = max_samples_per_task
        self.fast_dev_run = fast_dev_run
        self.dataset_overrides = dict(datasets or {})
        for name in self.dataset_overrides:  # entries for other known tasks are fine (sweeps)
            get_task_spec(name)  # but a typo is an error, not a silently ignored override
        self.validation_fraction = validation_fraction
        self.validation_max = validation_max
        self.cache_heads = cache_heads
        self.seed = seed

    # -- data --------------------------------------------------------------------------------
    def load_split(self, task: str, split: str):
        """The task's ``split`` as a ``datasets.Dataset`` (validation carved from train if needed).

        ``split`` is ``test``, ``validation`` or ``train``; where validation is carved out of the
        training split, ``train`` is the rest of it (data-using merge methods calibrate on it, so
        validation stays unseen)."""
        spec = self.specs[task]
        if split == "test":
            ds = self._load(spec, spec.test_split)
        elif spec.validation_split is not None:
            name = spec.validation_split if split == "validation" else spec.train_split
            ds = self._load(spec, name)
        else:
            train = self._load(spec, spec.train_split)
            n_val = min(int(len(train) * self.validation_fraction), self.validation_max)
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed))
            part = order[:n_val] if split == "validation" else order[n_val:]
            ds = train.select(sorted(part.tolist()))
        if self.max_samples_per_task is not None and len(ds) > self.max_samples_per_task:
            # A seeded subset, not the first rows: some datasets are sorted by class.
            order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(self.seed))
            ds = ds.select(sorted(order[: self.max_samples_per_task].tolist()))
        return ds

    def _load(self, spec: TaskSpec, split: str):
        import datasets

        source = self.dataset_overrides.get(spec.name) or resolve_dataset_path(spec)
        source = os.path.expanduser(source)
        if source.startswith(("/", ".")) and not os.path.exists(source):
            raise FusionBenchError(
                f"Dataset directory '{source}' of task '{spec.name}' does not exist. Fix the path "
                f"(taskpool.datasets.{spec.name}) or the task spec's `dataset`."
            )
        try:
            ds = datasets.load_dataset(source, spec.subset, split=split)
        except ValueError as e:
            if "split" in str(e).lower():
                raise FusionBenchError(
                    f"Dataset '{source}' of task '{spec.name}' has no split '{split}' ({e}). Fix the "
                    "split names in the task spec or point taskpool.datasets at the right dataset."
                ) from None
            raise self._unavailable(spec, source, e) from None
        except Exception as e:
            raise self._unavailable(spec, source, e) from None
        for column in (spec.image_column, spec.label_column):
            if column not in ds.column_names:
                raise FusionBenchError(
                    f"Dataset '{source}' of task '{spec.name}' has no column '{column}' (columns: "
                    f"{ds.column_names}).{did_you_mean(column, ds.column_names)} Fix "
                    "image_column/label_column in the task spec."
                )
        return ds

    @staticmethod
    def _unavailable(spec: TaskSpec, source: str, e: Exception) -> FusionBenchError:
        first = f"{type(e).__name__}: {e}".splitlines()[0]
        return FusionBenchError(
            f"Cannot load dataset '{source}' for task '{spec.name}' ({first}). Offline, a hub "
            f"dataset must already be in the Hugging Face cache: run `datasets.load_dataset("
            f"'{source}')` once on a machine with network, or set "
            f"`taskpool.datasets.{spec.name}=<local dataset directory>`."
        )

    def loader(self, ds, spec: TaskSpec, preprocess):
        """Batches ``(images (B,3,H,W), labels (B,))`` of ``ds`` in order, preprocessed."""
        image_col, label_col = spec.image_column, spec.label_column

        def transform(batch: dict) -> dict:
            return {
                "pixel_values": [preprocess(image) for image in batch[image_col]],
                "label": batch[label_col],
            }

        def collate(rows: list[dict]) -> tuple[Tensor, Tensor]:
            images = torch.stack([r["pixel_values"] for r in rows])  # (B, 3, H, W)
            labels = torch.tensor([int(r["label"]) for r in rows])  # (B,); int(): pcam has bools
            return images, labels

        return torch.utils.data.DataLoader(
            ds.with_transform(transform),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate,
            shuffle=False,
        )

    # -- heads -------------------------------------------------------------------------------
    def zero_shot_head(self, classifier: ZeroShotClassifier, task: str, device) -> Tensor:
        """(D, C) head for ``task``; cached on disk keyed by text tower, class names, templates."""
        spec = self.specs[task]
        key = cache_key(classifier.head_cache_key, task, *spec.classnames, "\x1e", *spec.templates)
        path = cache_dir() / "heads" / f"{task}-{key}.pt"
        if self.cache_heads and path.is_file():
            return torch.load(path, map_location=device, weights_only=True)
        log.info("building zero-shot head for %s (%d classes)", task, spec.num_classes)
        head = classifier.zero_shot_head(spec.classnames, spec.templates, device).float()
        if self.cache_heads:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")  # atomic: parallel sweep jobs share it
            torch.save(head.cpu(), tmp)
            os.replace(tmp, path)
        return head.to(device)

    # -- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(
        self,
        model: ZeroShotClassifier | Mapping[str, ZeroShotClassifier],
        fabric=None,
    ) -> dict[str, float]:
        """Metrics ``<split>/<task>/acc``, ``<split>/<task>/loss`` and ``<split>/avg_acc``.

        ``model`` is one classifier for all tasks, or a mapping task -> classifier (e.g. each
        expert on its own task)."""
        from tqdm.auto import tqdm

        device = fabric.device if fabric is not None else torch.device("cpu")
        metrics: dict[str, float] = {}
        for split in self.splits:
            accs = []
            for task in self.tasks:
                classifier = self._classifier_for(model, task)
                classifier.encoder.to(device).eval()
                spec = self.specs[task]
                head = self.zero_shot_head(classifier, task, device)
                ds = self.load_split(task, split)
                correct, total, loss_sum = 0, 0, 0.0
                batches = self.loader(ds, spec, classifier.preprocess)
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
