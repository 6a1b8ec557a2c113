"""Every YAML under conf/ composes, and its keys bind to its `_target_`'s signature.

A misspelt or renamed hyper-parameter therefore fails here, not as a silent default at run time.
Parametrised over the files themselves: a new config is tested with no extra work.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fusion_bench.paths import config_dir

CONF = config_dir()
GROUPS = ("method", "modelpool", "taskpool", "fabric", "logger")
OPTIONS = [
    (g, str(p.relative_to(CONF / g).with_suffix("")))
    for g in GROUPS
    for p in sorted((CONF / g).rglob("*.yaml"))
]


def _target(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}/{o}" for g, o in OPTIONS])
def test_config_binds_to_target(group: str, option: str) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("config", overrides=[f"{group}={option}"])
    node = cfg.get(group)
    if not node:  # e.g. logger=none
        return
    assert "_target_" in node, f"conf/{group}/{option}.yaml has no _target_"
    target = _target(node._target_)
    keys = [k for k in node if not str(k).startswith("_")]
    signature = inspect.signature(target)
    signature.bind(**{k: None for k in keys})  # TypeError names the unknown key
    if group in ("method", "modelpool", "taskpool"):
        params = signature.parameters.values()
        assert not any(p.kind is p.VAR_KEYWORD for p in params), f"{target} takes **kwargs"


def test_suites_compose_into_pools() -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        for suite in ("ta8", "tall14", "tall20"):
            cfg = compose("config", overrides=[f"suite={suite}", "modelpool=clip_vision_l14"])
            tasks = OmegaConf.to_container(cfg.modelpool, resolve=True)["tasks"]
            assert tasks == list(cfg.suite.tasks)
            assert cfg.modelpool.pretrained == "openai/clip-vit-large-patch14"
            assert len(tasks) == {"ta8": 8, "tall14": 14, "tall20": 20}[suite]


def test_every_yaml_says_what_it_is() -> None:
    for path in Path(CONF).rglob("*.yaml"):
        assert path.read_text().lstrip().startswith("#"), f"{path} lacks a leading comment"
