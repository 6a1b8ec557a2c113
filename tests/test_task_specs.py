"""Offline checks of the task specs (fusion_bench/taskpool/tasks/*.yaml) and suites (conf/suite)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fusion_bench.errors import FusionBenchError
from fusion_bench.taskpool import tasks as tasks_mod
from fusion_bench.taskpool.tasks import (
    TaskSpec,
    get_task_spec,
    list_tasks,
    load_spec_file,
    resolve_dataset_path,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SUITE_DIR = REPO_ROOT / "conf" / "suite"

TA8 = ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
TALL14 = TA8 + ["oxford_flowers102", "pcam", "fer2013", "oxford-iiit-pet", "stl10", "cifar100"]
TALL20 = TALL14 + [
    "cifar10",
    "food101",
    "fashion_mnist",
    "emnist_letters",
    "kmnist",
    "rendered-sst2",
]

# Class counts of the datasets themselves; a wrong count means the head cannot match the labels.
CLASS_COUNTS = {
    "sun397": 397,
    "stanford-cars": 196,
    "resisc45": 45,
    "eurosat": 10,
    "svhn": 10,
    "gtsrb": 43,
    "mnist": 10,
    "dtd": 47,
    "oxford_flowers102": 102,
    "pcam": 2,
    "fer2013": 7,
    "oxford-iiit-pet": 37,
    "stl10": 10,
    "cifar100": 100,
    "cifar10": 10,
    "food101": 101,
    "fashion_mnist": 10,
    "emnist_letters": 26,
    "kmnist": 10,
    "rendered-sst2": 2,
}


def test_every_tall20_task_has_a_spec() -> None:
    assert set(TALL20) <= set(list_tasks())
    assert set(CLASS_COUNTS) == set(TALL20)


@pytest.mark.parametrize("name", list_tasks())
def test_spec_loads_and_is_well_formed(name: str) -> None:
    spec = get_task_spec(name)
    assert isinstance(spec, TaskSpec)
    assert spec.name == name
    assert spec.dataset.strip()
    assert spec.classnames and len(set(spec.classnames)) == len(spec.classnames)
    assert all(isinstance(c, str) and c.strip() for c in spec.classnames)
    assert spec.templates
    for template in spec.templates:
        assert template.count("{c}") == 1, template
        filled = template.format(c="<CLASS>")
        assert "<CLASS>" in filled and "{" not in filled
    assert spec.prompts(spec.classnames[0])[0] == spec.templates[0].format(c=spec.classnames[0])
    assert spec.validation_split != spec.test_split


@pytest.mark.parametrize(("name", "count"), sorted(CLASS_COUNTS.items()))
def test_known_class_counts(name: str, count: int) -> None:
    assert get_task_spec(name).num_classes == count


def test_spot_check_label_order() -> None:
    # Index i must be the name of integer label i; these are the easy-to-verify anchors.
    assert get_task_spec("mnist").classnames == tuple(str(i) for i in range(10))
    assert get_task_spec("emnist_letters").classnames[0] == "A"
    assert get_task_spec("emnist_letters").classnames[-1] == "Z"
    assert get_task_spec("cifar10").classnames[:2] == ("airplane", "automobile")
    assert get_task_spec("stanford-cars").classnames[0] == "AM General Hummer SUV 2000"
    assert get_task_spec("sun397").classnames[0] == "abbey"
    assert get_task_spec("food101").classnames[-1] == "waffles"


def test_spec_lookup_is_cached_and_frozen() -> None:
    spec = get_task_spec("mnist")
    assert get_task_spec("mnist") is spec
    with pytest.raises(AttributeError):
        spec.name = "other"  # type: ignore[misc]
    hash(spec)  # frozen + tuples => usable as a dict key


def test_suites_name_only_known_tasks() -> None:
    suites = sorted(SUITE_DIR.glob("*.yaml"))
    assert suites, f"no suites in {SUITE_DIR}"
    known = set(list_tasks())
    for path in suites:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert isinstance(data, dict) and isinstance(data.get("tasks"), list), path
        names = data["tasks"]
        assert names and len(set(names)) == len(names), path
        assert set(names) <= known, (path, sorted(set(names) - known))


@pytest.mark.parametrize(
    ("suite", "expected"), [("ta8", TA8), ("tall14", TALL14), ("tall20", TALL20)]
)
def test_canonical_suite_order(suite: str, expected: list[str]) -> None:
    data = yaml.safe_load((SUITE_DIR / f"{suite}.yaml").read_text(encoding="utf-8"))
    assert data == {"tasks": expected}


def test_unknown_task_names_the_task_and_suggests_a_fix() -> None:
    with pytest.raises(FusionBenchError) as info:
        get_task_spec("mnsit")
    message = str(info.value)
    assert "'mnsit'" in message
    assert "Did you mean 'mnist'" in message
    assert "fusion_bench/taskpool/tasks/mnsit.yaml" in message
    assert "sun397" in message  # lists the known tasks


def test_unknown_task_cannot_escape_the_tasks_dir() -> None:
    with pytest.raises(FusionBenchError):
        get_task_spec("../tasks/mnist")


# --- malformed specs -----------------------------------------------------------------------------

_DROP = object()  # marks a key to delete from GOOD

GOOD = {
    "name": "toy",
    "dataset": "fusion_bench:toy",
    "classnames": ["cat", "dog"],
    "templates": ["a photo of a {c}."],
}


def _write(tmp_path: Path, data: object, name: str = "toy") -> Path:
    path = tmp_path / f"{name}.yaml"
    text = data if isinstance(data, str) else yaml.safe_dump(data)
    path.write_text(text, encoding="utf-8")
    return path


def test_good_spec_in_temp_dir_loads_with_defaults(tmp_path: Path) -> None:
    spec = load_spec_file(_write(tmp_path, GOOD))
    assert spec == TaskSpec(
        name="toy",
        dataset="fusion_bench:toy",
        classnames=("cat", "dog"),
        templates=("a photo of a {c}.",),
    )
    assert (spec.image_column, spec.label_column) == ("image", "label")
    assert (spec.train_split, spec.test_split, spec.validation_split) == ("train", "test", None)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"classnames": _DROP}, "classnames"),
        ({"templates": _DROP}, "templates"),
        ({"colour": "red"}, "colour"),
        ({"templates": ["a photo of a {}."]}, "templates"),
        ({"templates": ["{c} and {c}"]}, "templates"),
        ({"templates": ["a {c} of {kind}"]}, "templates"),
        ({"classnames": ["cat", "cat"]}, "classnames"),
        ({"classnames": [1, 2]}, "classnames"),
        ({"classnames": []}, "classnames"),
        ({"test_split": ""}, "test_split"),
        ({"validation_split": 3}, "validation_split"),
        ({"name": "other"}, "name"),
    ],
)
def test_malformed_spec_names_file_and_field(
    tmp_path: Path, change: dict[str, object], field: str
) -> None:
    data = dict(GOOD)
    for key, value in change.items():
        if value is _DROP:
            data.pop(key)
        else:
            data[key] = value
    path = _write(tmp_path, data)
    with pytest.raises(FusionBenchError) as info:
        load_spec_file(path)
    message = str(info.value)
    assert str(path) in message
    assert repr(field) in message


@pytest.mark.parametrize("text", ["name: [unclosed", "- just\n- a list\n", ""])
def test_unparsable_spec_names_file(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(FusionBenchError, match="toy.yaml"):
        load_spec_file(path)


def test_missing_spec_file(tmp_path: Path) -> None:
    with pytest.raises(FusionBenchError, match="nope.yaml"):
        load_spec_file(tmp_path / "nope.yaml")


# --- dataset resolution --------------------------------------------------------------------------


def test_resolve_hub_id_unchanged() -> None:
    assert resolve_dataset_path(get_task_spec("sun397")) == "tanganke/sun397"


def test_resolve_packaged_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "toy").mkdir()
    monkeypatch.setattr(tasks_mod, "_DATA_DIR", tmp_path)
    spec = load_spec_file(_write(tmp_path, GOOD))
    assert resolve_dataset_path(spec) == str((tmp_path / "toy").resolve())


def test_resolve_packaged_dataset_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks_mod, "_DATA_DIR", tmp_path)
    missing = load_spec_file(_write(tmp_path, GOOD))
    with pytest.raises(FusionBenchError, match="not found"):
        resolve_dataset_path(missing)
    escaping = load_spec_file(_write(tmp_path, {**GOOD, "dataset": "fusion_bench:../../etc"}))
    with pytest.raises(FusionBenchError, match="outside"):
        resolve_dataset_path(escaping)
