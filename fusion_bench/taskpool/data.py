"""Task data: the data half of the evaluator, one object the runner builds once and hands to the
methods that use data (Fisher, RegMean, RegMean++, AdaMerging, and routers trained on a few
samples) as well as to the evaluator.

- ``load_split(task, split)``: a task's ``test``, ``validation`` or ``train`` split as a
  ``datasets.Dataset``, read with ``datasets.load_dataset`` whether it is a hub id or a local
  directory. Tasks without a validation split get one carved out of train (a seeded
  ``validation_fraction``, at most ``validation_max`` images); ``train`` is then the rest, so data
  used by a merge never overlaps the validation data used to select its hyper-parameters.
- ``max_samples`` / ``seed``: a seeded subset of a split (not its first rows: some datasets are
  sorted by class).
- ``loader(ds, task, preprocess, batch_size)``: batches ``(images (B, 3, H, W), labels (B,))``.
- ``images(task, split, preprocess, num_samples, batch_size, seed)``: unlabeled image batches of a
  seeded sample (calibration data).
- ``zero_shot_head(classifier, task, device)``: the (D, C) head from the task's class names ×
  templates, cached on disk keyed by text tower, class names and templates.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator

import torch
from torch import Tensor

from fusion_bench.errors import FusionBenchError, did_you_mean
from fusion_bench.modelpool.base import ZeroShotClassifier, cache_key
from fusion_bench.paths import cache_dir
from fusion_bench.taskpool.tasks import TaskSpec, get_task_spec, resolve_dataset_path

log = logging.getLogger(__name__)
SPLITS = ("test", "validation", "train")


class TaskData:
    """Splits, seeded samples, loaders and zero-shot heads of the registered tasks."""

    def __init__(
        self,
        datasets: dict[str, str] | None = None,
        num_workers: int = 0,
        validation_fraction: float = 0.1,
        validation_max: int = 5000,
        cache_heads: bool = True,
        seed: int = 0,
    ):
        self.dataset_overrides = dict(datasets or {})
        for name in self.dataset_overrides:  # entries for other known tasks are fine (sweeps)
            get_task_spec(name)  # but a typo is an error, not a silently ignored override
        self.num_workers = num_workers
        self.validation_fraction = validation_fraction
        self.validation_max = validation_max
        self.cache_heads = cache_heads
        self.seed = seed

    @staticmethod
    def spec(task: str) -> TaskSpec:
        """The task's spec (an unknown task name is an error naming the known ones)."""
        return get_task_spec(task)

    # -- splits ------------------------------------------------------------------------------
    def load_split(
        self, task: str, split: str, max_samples: int | None = None, seed: int | None = None
    ):
        """The task's ``split`` as a ``datasets.Dataset``; with ``max_samples``, a subset of at
        most that many rows drawn with ``seed`` (default: this object's seed)."""
        if split not in SPLITS:
            raise FusionBenchError(f"Unknown split '{split}'; use one of {list(SPLITS)}.")
        spec = self.spec(task)
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
        if max_samples is not None and len(ds) > max_samples:
            generator = torch.Generator().manual_seed(self.seed if seed is None else seed)
            order = torch.randperm(len(ds), generator=generator)
            ds = ds.select(sorted(order[:max_samples].tolist()))
        return ds

    def _load(self, spec: TaskSpec, split: str):
        source = self.dataset_overrides.get(spec.name) or resolve_dataset_path(spec)
        source = os.path.expanduser(source)
        if source.startswith(("/", ".")) and not os.path.exists(source):
            raise FusionBenchError(
                f"Dataset directory '{source}' of task '{spec.name}' does not exist. Fix the path "
                f"(taskpool.datasets.{spec.name}) or the task spec's `dataset`."
            )
        try:
            ds = _load_dataset(source, spec.subset, split, _mtime(source))
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

    # -- batches -----------------------------------------------------------------------------
    def loader(self, ds, task: str, preprocess, batch_size: int):
        """Batches ``(images (B,3,H,W), labels (B,))`` of ``ds`` in order, preprocessed."""
        spec = self.spec(task)
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
            batch_size=batch_size,
            num_workers=self.num_workers,
            collate_fn=collate,
            shuffle=False,
        )

    def images(
        self,
        task: str,
        split: str,
        preprocess,
        num_samples: int,
        batch_size: int,
        seed: int = 0,
    ) -> Iterator[Tensor]:
        """(B, 3, H, W) CPU batches of a seeded sample of ``num_samples`` images of ``task``'s
        ``split``, in a fixed order; labels are never read."""
        check_sample_size(num_samples, batch_size)
        ds = self.load_split(task, split, max_samples=num_samples, seed=seed)
        for images, _labels in self.loader(ds, task, preprocess, batch_size):
            yield images

    # -- heads -------------------------------------------------------------------------------
    def zero_shot_head(self, classifier: ZeroShotClassifier, task: str, device) -> Tensor:
        """(D, C) head for ``task``; cached on disk keyed by text tower, class names, templates."""
        spec = self.spec(task)
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


def check_sample_size(num_samples: int, batch_size: int) -> None:
    """For a method's constructor: its data sample settings, checked before anything loads."""
    if num_samples < 1 or batch_size < 1:
        raise FusionBenchError(
            f"A data sample needs num_samples >= 1 and batch_size >= 1 (got {num_samples}, "
            f"{batch_size}); fix the method's number-of-examples / batch_size settings."
        )


@functools.lru_cache(maxsize=64)
def _load_dataset(source: str, subset: str | None, split: str, mtime: int | None):
    """``datasets.load_dataset``, once per process for the same dataset and split (``mtime``: a
    local directory's modification time, so an edited directory is read again). A sweep's jobs
    and the evaluation of several splits share the loaded Arrow tables instead of resolving
    the data files again each time (measured: 0.1 s per load of a tiny8 task, 16 per job)."""
    import datasets

    return datasets.load_dataset(source, subset, split=split)


def _mtime(source: str) -> int | None:
    try:
        return os.stat(source).st_mtime_ns
    except OSError:
        return None  # a hub id
