"""The method contract (fusion_bench/method/base.py), checked over every method config.

Parametrised over the YAML files themselves: a new method is covered by the CLI smoke test, the
Python API test and the contract checks with no edit here.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping

import pytest
import torch

import fusion_bench
from fusion_bench.api import build_method, method_config
from fusion_bench.errors import FusionBenchError
from fusion_bench.method import base
from fusion_bench.method.base import (
    STATE_DICT_KINDS,
    Context,
    RoutedMethod,
    RoutedModel,
    SequentialMerge,
    merge_sequentially,
    pool_experts,
)
from fusion_bench.method.simple_average import SimpleAverage
from fusion_bench.paths import config_dir
from fusion_bench.taskpool.clip_classification import CLIPClassificationTaskPool
from fusion_bench.testing import as_experts, assert_state_dict_close
from tests.conftest import TASKS
from tests.test_cli import run_cli

METHOD_DIR = config_dir() / "method"
METHODS = sorted(str(p.relative_to(METHOD_DIR).with_suffix("")) for p in METHOD_DIR.rglob("*.yaml"))
KIND_BASES = {
    "merge": base.StateDictMerge,
    "data_merge": base.DataMerge,
    "lora_merge": base.LoRAMerge,
    "sequential": base.SequentialMerge,
    "per_task": base.PerTaskMethod,
    "routed": base.RoutedMethod,
    "ensemble": base.EnsembleMethod,
}
# Options a method cannot run without on a 2-expert pool (everything else: the YAML's defaults).
REQUIRED = {
    "weighted_average": {"weights": [1.0, 1.0]},
    "checkpoint": {"path": "<the tiny open_clip pool's pretrained file>"},  # see required()
    "routed/checkpoint": {"path": "<a routed model saved on the tiny open_clip pool>"},
}
# Fast settings for the tiny pools (fewer samples / steps than the papers' defaults).
FAST = {
    "fisher_merging": {"num_fisher_examples": 8, "batch_size": 4},
    "regmean": {"num_regmean_examples": 8, "batch_size": 4},
    "regmean_plusplus": {"num_regmean_examples": 8, "batch_size": 4},
    "adamerging_task_wise": {"max_steps": 2, "batch_size": 4},
    "adamerging_layer_wise": {"max_steps": 2, "batch_size": 4},
    "adamerging_plusplus": {"max_steps": 2, "batch_size": 4},
    "routed/smile": {"k": 8},  # the default k = 128 exceeds the tiny pool's rank (32)
    "fusion/activation_matching": {"num_samples": 8, "batch_size": 4},
    "fusion/ot_fusion": {"num_samples": 8, "batch_size": 4},
    "fusion/pleas": {"num_samples": 8, "batch_size": 4, "steps": 2},
    "localize_and_stitch_learned": {
        "num_epochs": 2,
        "shots_per_class": 2,
        "max_samples": 8,
        "batch_size": 4,
    },
}


def required(name: str, files: dict | None = None) -> dict:
    """REQUIRED[name], with the placeholders that need the tiny pool's files filled in."""
    values = dict(REQUIRED.get(name, {}))
    if name == "checkpoint" and files is not None:
        values["path"] = files["pretrained"]  # a whole CLIP file: its image tower is evaluated
    if name == "routed/checkpoint" and files is not None:
        values["path"] = saved_routed_model(files)
    return values


def saved_routed_model(files: dict) -> str:
    """A MASS model of the tiny open_clip pool, saved as the runner saves routed models (once)."""
    from fusion_bench.method.routed.checkpoint import write_routed
    from fusion_bench.method.routed.mass import Mass
    from fusion_bench.modelpool.open_clip import OpenCLIPModelPool

    directory = files["root"] / "saved_mass"
    if not directory.is_dir():
        pool = OpenCLIPModelPool(
            files["model_name"], files["pretrained"], files["experts"], model_config=files["config"]
        )
        method = Mass()
        directory.mkdir()
        write_routed(method.build(pool, None, Context()), method, pool, directory, "# test\n")
    return str(directory)


def settings(name: str, files: dict | None = None) -> dict:
    return {**required(name, files), **FAST.get(name, {})}


def test_every_kind_is_listed_and_has_one_base():
    assert set(typing.get_args(base.Kind)) == set(KIND_BASES)
    for kind, cls in KIND_BASES.items():
        assert cls.kind == kind


@pytest.mark.parametrize("name", METHODS)
def test_method_is_one_frozen_dataclass_of_one_kind(name):
    method, _ = build_method(name, REQUIRED.get(name, {}))
    cls = type(method)
    assert dataclasses.is_dataclass(cls), f"{cls.__name__} is not a dataclass"
    assert cls.__dataclass_params__.frozen, f"{cls.__name__} is not frozen"
    kind_bases = [b for b in KIND_BASES.values() if issubclass(cls, b)]
    assert len(kind_bases) == 1 and cls.__mro__[1] is kind_bases[0], cls.__mro__
    assert not hasattr(method, "run"), "the pre-contract run() entry point is gone"
    for n in (1, 8, 20):
        held = method.models_held(n)
        assert isinstance(held, float) and held >= 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(method, dataclasses.fields(cls)[0].name if dataclasses.fields(cls) else "x", 0)


@pytest.mark.parametrize("name", METHODS)
def test_method_yaml_reads_only_its_own_group(name):
    text = (METHOD_DIR / f"{name}.yaml").read_text()
    assert "${" not in text, f"conf/method/{name}.yaml interpolates another group"
    assert "_target_" in method_config(name)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_runs_from_the_cli(
    name,
    open_clip_cli_args,
    lora_cli_args,
    independent_cli_args,
    open_clip_pool_files,
    tmp_path,
    capsys,
):
    values = settings(name, open_clip_pool_files)
    overrides = [f"method.{k}={v}".replace(" ", "") for k, v in values.items()]
    pool_args = open_clip_cli_args
    if name.startswith("lora/"):  # LoRA merges need LoRA experts
        pool_args = lora_cli_args
    elif name.startswith("fusion/"):  # fusion needs independently trained models
        pool_args = independent_cli_args
    code, out, err = run_cli(
        [
            *pool_args,
            f"method={name}",
            *overrides,
            "fast_dev_run=true",
            "logger=none",
            f"hydra.run.dir={tmp_path}",
        ],
        capsys,
    )
    assert code == 0, err[-3000:]
    assert f"== {name} ==" in out and "average" in out


@pytest.fixture
def pools(open_clip_pool, tiny_datasets):
    taskpool = CLIPClassificationTaskPool(list(TASKS), datasets=tiny_datasets, fast_dev_run=True)
    return open_clip_pool, taskpool


@pytest.mark.parametrize("name", METHODS)
def test_every_method_runs_through_the_python_api(
    name, pools, lora_pool, independent_pool, open_clip_pool_files
):
    modelpool, taskpool = pools
    if name.startswith("lora/"):  # LoRA merges need LoRA experts
        modelpool = lora_pool
    elif name.startswith("fusion/"):  # fusion needs independently trained models
        modelpool = independent_pool
    values = settings(name, open_clip_pool_files)
    method, _ = build_method(name, values)
    if method.kind in STATE_DICT_KINDS:
        merged = fusion_bench.merge(
            name, modelpool, data=taskpool, fabric=None, save_to=None, **values
        )
        reference = modelpool.expert(modelpool.expert_names[0])
        assert set(merged) == set(reference)
        assert all(t.isfinite().all() for t in merged.values() if t.is_floating_point())
    else:
        with pytest.raises(FusionBenchError, match="fusion_bench.evaluate"):
            fusion_bench.merge(name, modelpool, **values)
    metrics = fusion_bench.evaluate(name, modelpool, taskpool, fast_dev_run=True, **values)
    assert set(metrics) >= {f"test/{t}/acc" for t in TASKS} | {"test/avg_acc"}


# -- the sequential and routed kinds, with toy methods of their own -------------------------------
@dataclasses.dataclass(frozen=True)
class RunningAverage(SequentialMerge[tuple[dict, int]]):
    """θ_t = θ_{t-1} + (θ_new − θ_{t-1}) / t: after the last expert, the simple average."""

    def start(self, pretrained, context=None):
        return {k: v.float().clone() for k, v in pretrained.items()}, 0

    def absorb(self, state, name, expert):
        merged, count = state
        for key, value in merged.items():
            if value.is_floating_point():
                value += (expert[key].float() - value) / (count + 1)
        return merged, count + 1

    def merged(self, state):
        return {k: v.clone() for k, v in state[0].items()}


def test_sequential_kind_gives_the_model_after_every_expert(pools):
    modelpool, taskpool = pools
    pre, experts = modelpool.pretrained(), pool_experts(modelpool)
    steps = list(merge_sequentially(RunningAverage(), pre, experts))
    assert [name for name, _ in steps] == list(experts)
    first = next(iter(experts.values()))
    assert_state_dict_close(steps[0][1], first)  # one expert: that expert
    assert_state_dict_close(steps[-1][1], SimpleAverage().merge(pre, experts), atol=1e-6)
    # the runner's and the API's path: the final model
    assert_state_dict_close(fusion_bench.merge(RunningAverage(), modelpool), steps[-1][1])
    metrics = fusion_bench.evaluate(RunningAverage(), modelpool, taskpool)
    reference = fusion_bench.evaluate("simple_average", modelpool, taskpool)
    assert metrics == pytest.approx(reference, abs=1e-6)


class FirstExpertTower(RoutedModel):
    """Routes every image to the first expert: must score exactly as that expert (task-agnostic);
    with a task id, uses that expert (oracle)."""

    def __init__(self, pool):
        super().__init__(pool.expert_names)
        self.towers = torch.nn.ModuleList(
            pool.build_encoder(pool.expert(name)) for name in pool.expert_names
        )
        self.features = pool.classifier(self.towers[0]).features

    def forward(self, images, task=None):
        index = 0 if task is None else self.expert_index(task)
        if task is None:
            self.last_routing = torch.zeros(len(images), len(self.expert_names))
            self.last_routing[:, 0] = 1.0
        return self.features(self.towers[index], images)


@dataclasses.dataclass(frozen=True)
class FirstExpert(RoutedMethod):
    def build(self, pool, data, context):
        return FirstExpertTower(pool)

    def models_held(self, n_experts: int) -> float:
        return float(n_experts)


def test_routed_kind_is_evaluated_in_both_modes(pools):
    modelpool, taskpool = pools
    metrics = fusion_bench.evaluate(FirstExpert(), modelpool, taskpool)
    first = modelpool.expert_names[0]
    alone = fusion_bench.evaluate(
        "weighted_ensemble", modelpool, taskpool, weights=[1.0, 0.0], normalize=False
    )
    assert {k: v for k, v in metrics.items() if k in alone} == pytest.approx(alone, abs=1e-5)
    individual = fusion_bench.evaluate("individual", modelpool, taskpool)
    oracle = {k.removeprefix("oracle/"): v for k, v in metrics.items() if k.startswith("oracle/")}
    assert oracle == pytest.approx(individual, abs=1e-5)  # the task id picks each task's expert
    # routing accuracy: every image goes to the first expert
    assert metrics[f"routing/test/{first}/acc"] == 1.0
    assert all(metrics[f"routing/test/{t}/acc"] == 0.0 for t in TASKS if t != first)
    tower = FirstExpertTower(modelpool)  # stores N image towers
    per_tower = sum(t.numel() for t in modelpool.expert(first).values())
    assert tower.stored_parameters() == len(TASKS) * per_tower
    with pytest.raises(FusionBenchError, match="routed model"):
        fusion_bench.merge(FirstExpert(), modelpool)
    with pytest.raises(FusionBenchError, match="not an expert"):
        tower(torch.zeros(1, 3, 32, 32), task="cifar10")


def test_per_task_models_are_built_one_at_a_time(pools, monkeypatch):
    modelpool, taskpool = pools
    built = []
    original = modelpool.build_encoder
    monkeypatch.setattr(
        modelpool, "build_encoder", lambda state=None: built.append(1) or original(state)
    )
    model, state = base.build_classifiers(
        build_method("individual", {})[0], modelpool, taskpool.data, Context(), "individual"
    )
    assert state is None and isinstance(model, Mapping) and built == []
    model[TASKS[0]]
    assert built == [1]


def test_merge_results_with_nan_are_refused(pools):
    modelpool, _ = pools
    with pytest.raises(FusionBenchError, match="NaN/Inf"), pytest.warns(UserWarning, match="far"):
        fusion_bench.merge("task_arithmetic", modelpool, scaling_factor=float("inf"))


def test_method_instances_and_hyperparameters_do_not_mix(pools):
    modelpool, _ = pools
    with pytest.raises(FusionBenchError, match="method instance and hyper-parameters"):
        fusion_bench.merge(SimpleAverage(), modelpool, scaling_factor=0.3)
    pre = {"w": torch.zeros(2)}
    out = fusion_bench.merge(SimpleAverage(), pre, as_experts([{"w": torch.ones(2)}]))
    assert torch.equal(out["w"], torch.ones(2))


@pytest.mark.parametrize("name", METHODS)
def test_a_value_of_the_wrong_type_names_the_option(name):
    """Every typed option refuses a string where it wants a number (and a number where it wants a
    list), with the option's name — not an error from inside the maths later (issue 11)."""
    method, _ = build_method(name, REQUIRED.get(name, {}))
    fields = [f for f in dataclasses.fields(method) if f.init]
    if not fields:
        return
    for f in fields:
        wrong = 3.5 if "list" in str(f.type) and "float" not in str(f.type) else "abc"
        if "str" in str(f.type) and "list" not in str(f.type):
            continue  # a string is a valid value; the method's own check names bad choices
        with pytest.raises(FusionBenchError, match=rf"method\.{f.name}="):
            build_method(name, {**REQUIRED.get(name, {}), f.name: wrong})


def test_nan_hyperparameters_are_refused():
    with pytest.raises(FusionBenchError, match="scaling_factor is NaN"):
        build_method("task_arithmetic", {"scaling_factor": float("nan")})


def test_an_absurd_scaling_factor_is_warned_about():
    with pytest.warns(UserWarning, match="scaling_factor=1000000000.0"):
        build_method("task_arithmetic", {"scaling_factor": 1e9})
    with pytest.warns(UserWarning, match="far outside"):
        build_method("task_arithmetic", {"scaling_factor": [0.3, -500.0]})
