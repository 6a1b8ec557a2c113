"""Task specifications: which dataset a task evaluates on, its class names and prompt templates.

Each task is one YAML file, ``fusion_bench/taskpool/tasks/<name>.yaml``, whose keys are exactly the
fields of :class:`TaskSpec`. Keeping them as data (not Python) lets users add a task without
touching code, and lets the specs be reviewed against their sources line by line.

Everything a user can get wrong here (a typo in a task name, a missing key, a template without
``{c}``) is raised as :class:`~fusion_bench.errors.FusionBenchError` naming the file and the fix.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from fusion_bench.errors import FusionBenchError, did_you_mean
from fusion_bench.paths import PACKAGE_DIR, PACKAGE_PREFIX

__all__ = [
    "DATA_PREFIX",
    "TASKS_DIR",
    "TaskSpec",
    "get_task_spec",
    "list_tasks",
    "load_spec_file",
    "resolve_dataset_path",
]

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
# Small datasets shipped inside the package (test fixtures, toy tasks) are referenced as
# "fusion_bench:<path>" so a spec stays valid wherever the package is installed.
DATA_PREFIX = PACKAGE_PREFIX
_DATA_DIR = PACKAGE_DIR / "data"

# The one placeholder a template may use. A named field (not "{}") so that a template written for
# str.format with positional args fails loudly instead of silently formatting the wrong thing.
_PLACEHOLDER = "{c}"


@dataclass(frozen=True)
class TaskSpec:
    """Everything needed to build a zero-shot CLIP classification head and its eval data."""

    name: str
    # HF hub id ("tanganke/mnist"), a local directory, or "fusion_bench:<path under data/>".
    dataset: str
    # Ordered so that classnames[i] is the name of integer label i in the dataset.
    classnames: tuple[str, ...]
    # str.format templates with exactly one "{c}"; the text head averages over all of them.
    templates: tuple[str, ...]
    image_column: str = "image"
    label_column: str = "label"
    train_split: str = "train"
    test_split: str = "test"
    # None => the evaluator carves a validation set out of train (what FusionBench does too).
    validation_split: str | None = None
    # HF dataset configuration name (``load_dataset(dataset, subset)``); only needed for hub
    # datasets with several configs, e.g. SVHN's "cropped_digits".
    subset: str | None = None
    description: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def prompts(self, classname: str) -> list[str]:
        """All templates filled in with ``classname``."""
        return [t.format(c=classname) for t in self.templates]


_FIELDS = {f.name: f for f in fields(TaskSpec)}
_REQUIRED = ("name", "dataset", "classnames", "templates")
_OPTIONAL_STR = ("validation_split", "subset")


def _bad(path: Path, field: str | None, problem: str, fix: str) -> FusionBenchError:
    where = f"{path}" if field is None else f"{path}, field {field!r}"
    return FusionBenchError(f"Malformed task spec {where}: {problem}. {fix}")


def _str_list(path: Path, field: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise _bad(path, field, "must be a non-empty list of strings", "Write it as a YAML list.")
    for i, item in enumerate(value):
        # PyYAML turns unquoted 1, yes, no, on ... into int/bool; insist on strings so a class
        # name never silently changes type (or spelling) on the way in.
        if not isinstance(item, str) or not item.strip():
            raise _bad(
                path,
                field,
                f"item {i} is {item!r} ({type(item).__name__}), not a non-empty string",
                "Quote it in the YAML.",
            )
    return tuple(value)


def _check_template(path: Path, index: int, template: str) -> None:
    count = template.count(_PLACEHOLDER)
    if count != 1:
        raise _bad(
            path,
            "templates",
            f"template {index} {template!r} contains {_PLACEHOLDER!r} {count} times",
            f"Each template needs exactly one {_PLACEHOLDER} where the class name goes.",
        )
    try:
        template.format(c="x")
    except (KeyError, IndexError, ValueError) as err:
        raise _bad(
            path,
            "templates",
            f"template {index} {template!r} does not format with only c=...: {err!r}",
            "Use {c} as the only placeholder; write literal braces as {{ and }}.",
        ) from err


def load_spec_file(path: str | Path) -> TaskSpec:
    """Parse and validate one task YAML. Not cached: use :func:`get_task_spec` for lookups."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise FusionBenchError(f"Cannot read task spec {path}: {err}.") from err
    except yaml.YAMLError as err:
        raise _bad(path, None, f"not valid YAML ({err})", "Fix the YAML syntax.") from err
    if not isinstance(raw, dict):
        raise _bad(
            path,
            None,
            "the top level must be a mapping of field: value",
            f"See {TASKS_DIR / 'mnist.yaml'} for an example.",
        )

    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise _bad(
            path,
            unknown[0],
            f"unknown field(s) {unknown}",
            f"Allowed fields: {', '.join(_FIELDS)}.",
        )
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise _bad(path, missing[0], f"missing required field(s) {missing}", "Add them.")

    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "classnames":
            names = _str_list(path, key, value)
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise _bad(
                    path, key, f"duplicate class names {dupes}", "Class names must be unique."
                )
            values[key] = names
        elif key == "templates":
            templates = _str_list(path, key, value)
            for i, t in enumerate(templates):
                _check_template(path, i, t)
            values[key] = templates
        elif key in _OPTIONAL_STR and value is None:
            values[key] = None
        elif key == "description" and value is None:
            values[key] = ""
        elif not isinstance(value, str) or (key != "description" and not value.strip()):
            raise _bad(path, key, f"must be a non-empty string, got {value!r}", "Quote it.")
        else:
            values[key] = value

    # The file name is the lookup key; a mismatched `name:` is almost always a copy-paste slip.
    if values["name"] != path.stem:
        raise _bad(
            path,
            "name",
            f"name {values['name']!r} does not match the file name {path.stem!r}",
            f"Rename the file to {values['name']}.yaml or set name: {path.stem}.",
        )
    return TaskSpec(**values)


@functools.cache
def _known_tasks() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in TASKS_DIR.glob("*.yaml")))


def list_tasks() -> list[str]:
    """Names of all tasks with a spec file, sorted."""
    return list(_known_tasks())


@functools.cache  # lru_cache without a bound: ~20 small specs
def get_task_spec(name: str) -> TaskSpec:
    """The spec of task ``name`` (e.g. ``"sun397"``), loaded once and cached."""
    known = _known_tasks()
    if name not in known:
        raise FusionBenchError(
            f"Unknown task {name!r}.{did_you_mean(name, known)} "
            f"Known tasks: {', '.join(known)}. "
            f"Check the spelling in `taskpool.tasks` (or the suite file), "
            f"or add fusion_bench/taskpool/tasks/{name}.yaml."
        )
    return load_spec_file(TASKS_DIR / f"{name}.yaml")


def resolve_dataset_path(spec: TaskSpec) -> str:
    """What to pass to ``datasets.load_dataset``: a hub id, or an absolute local path.

    "fusion_bench:<rel>" resolves under the package's ``data/`` directory; "~" is expanded;
    anything else (a hub id or a plain path) is returned unchanged.
    """
    dataset = spec.dataset
    if dataset.startswith(DATA_PREFIX):
        rel = dataset[len(DATA_PREFIX) :].lstrip("/")
        root = _DATA_DIR.resolve()
        path = (root / rel).resolve()
        if not path.is_relative_to(root):
            raise FusionBenchError(
                f"Task {spec.name!r}: dataset {dataset!r} points outside fusion_bench/data/. "
                f"Use a path relative to {root}, or an absolute local path without the prefix."
            )
        if not path.exists():
            raise FusionBenchError(
                f"Task {spec.name!r}: packaged dataset {dataset!r} not found at {path}. "
                "Reinstall fusion_bench, or point `dataset:` at a hub id or a local directory."
            )
        return str(path)
    if dataset.startswith("~"):
        return str(Path(dataset).expanduser())
    return dataset
