"""``fusion_bench.merge``: methods resolved from their YAMLs, inputs as paths, state dicts or pools."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fusion_bench
from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import pool_experts
from fusion_bench.method.task_arithmetic import TaskArithmetic
from fusion_bench.method.ties_merging import TiesMerging
from fusion_bench.modelpool.clip_vision import CLIPVisionModelPool
from fusion_bench.modelpool.open_clip import OpenCLIPModelPool
from fusion_bench.testing import as_experts, assert_state_dict_close


def make_state(seed: int, scale: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": scale * torch.randn(6, 4, generator=g),
        "b": scale * torch.randn(4, generator=g),
        "ids": torch.arange(3),
    }


@pytest.fixture
def sds():
    pre = make_state(0)
    return pre, [
        {k: v + make_state(i, 0.1)[k] if v.is_floating_point() else v for k, v in pre.items()}
        for i in (1, 2, 3)
    ]


def test_import_is_light_and_merge_is_lazy():
    code = "import sys, fusion_bench; assert 'torch' not in sys.modules; print(fusion_bench.merge)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "function merge" in proc.stdout
    with pytest.raises(AttributeError):
        fusion_bench.no_such_thing  # noqa: B018


def test_state_dicts_with_yaml_defaults_and_overrides(sds):
    pre, fts = sds
    # ties_merging.yaml defaults: scaling_factor 0.3, threshold 20, merge_func sum
    assert_state_dict_close(
        fusion_bench.merge("ties_merging", pre, fts),
        TiesMerging(scaling_factor=0.3, threshold=20, merge_func="sum").merge(pre, as_experts(fts)),
    )
    out = fusion_bench.merge("ties_merging", pre, fts, scaling_factor=0.6, merge_func="mean")
    expected = TiesMerging(scaling_factor=0.6, threshold=20, merge_func="mean")
    assert_state_dict_close(out, expected.merge(pre, as_experts(fts)))
    named = fusion_bench.merge(
        "weighted_average",
        pre,
        dict(zip("xyz", fts, strict=True)),
        weights={"z": 1.0, "x": 0.0, "y": 0.0},
    )
    assert_state_dict_close(named, fts[2])
    assert_state_dict_close(fusion_bench.merge("pretrained", pre, fts), pre)


def test_unknown_names_are_clear_errors(sds):
    pre, fts = sds
    with pytest.raises(FusionBenchError, match=r"scaling_factr.*Valid:.*scaling_factor"):
        fusion_bench.merge("task_arithmetic", pre, fts, scaling_factr=0.3)
    with pytest.raises(FusionBenchError, match="Did you mean 'ties_merging'"):
        fusion_bench.merge("ties_mergin", pre, fts)
    with pytest.raises(FusionBenchError, match="needs the fine-tuned experts"):
        fusion_bench.merge("task_arithmetic", pre)
    with pytest.raises(FusionBenchError, match=r"one model per task.*fusion_bench\.evaluate"):
        fusion_bench.merge("individual", pre, fts)
    with pytest.raises(FusionBenchError, match=r"output ensemble.*fusion_bench\.evaluate"):
        fusion_bench.merge("simple_ensemble", pre, fts)
    with pytest.raises(FusionBenchError, match="Pass a model pool"):  # builds models: needs a pool
        fusion_bench.merge("fisher_merging", pre, fts)


def test_methods_needing_more_than_state_dicts_say_so(sds):
    from fusion_bench.api import StateDictPool

    pool = StateDictPool(sds[0], {"a": sds[1][0]}, "some_data_method")
    with pytest.raises(FusionBenchError, match=r"modelpool\.build_encoder.*CLI"):
        pool.build_encoder()


def test_open_clip_files_equal_the_pool(open_clip_pool_files):
    f = open_clip_pool_files
    pool = OpenCLIPModelPool(
        f["model_name"], f["pretrained"], f["experts"], model_config=f["config"]
    )
    expected = TaskArithmetic(scaling_factor=0.5).merge(pool.pretrained(), pool_experts(pool))
    # the pretrained file is a whole open_clip CLIP: its image tower is picked out
    out = fusion_bench.merge(
        "task_arithmetic", f["pretrained"], list(f["experts"].values()), scaling_factor=0.5
    )
    assert_state_dict_close(out, expected)
    assert_state_dict_close(
        fusion_bench.merge("task_arithmetic", pool, scaling_factor=0.5), expected
    )
    with pytest.raises(FusionBenchError, match="omit `finetuned`"):
        fusion_bench.merge("task_arithmetic", pool, f["experts"])


def test_hf_directories_equal_the_pool(hf_pool_files, tmp_path):
    from safetensors.torch import load_file

    f = hf_pool_files
    pool = CLIPVisionModelPool(f["pretrained"], f["experts"])
    expected = TiesMerging().merge(pool.pretrained(), pool_experts(pool))
    target = tmp_path / "merged.safetensors"
    out = fusion_bench.merge("ties_merging", f["pretrained"], f["experts"], save_to=target)
    assert_state_dict_close(out, expected)
    assert_state_dict_close(load_file(target), expected)
    with pytest.raises(FusionBenchError, match="overwrite=True"):
        fusion_bench.merge("ties_merging", f["pretrained"], f["experts"], save_to=target)
    fusion_bench.merge(
        "simple_average", f["pretrained"], f["experts"], save_to=target, overwrite=True
    )
    assert not torch.equal(
        load_file(target)["post_layernorm.weight"], expected["post_layernorm.weight"]
    )
    with pytest.raises(FusionBenchError, match="does not exist"):
        fusion_bench.merge("ties_merging", f["pretrained"], [str(tmp_path / "nope.safetensors")])
