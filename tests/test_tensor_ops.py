"""Closed-form oracles for the streaming linear merges."""

from __future__ import annotations

import pytest
import torch

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.simple_average import simple_average
from fusion_bench.method.task_arithmetic import task_arithmetic
from fusion_bench.tensor_ops import add_weighted_task_vectors, check_same_architecture
from fusion_bench.testing import assert_state_dict_close


def make_state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(4, 3, generator=g),
        "a.bias": torch.randn(4, generator=g),
        "pos_ids": torch.arange(5),  # integer buffer: never merged
    }


@pytest.fixture
def pool():
    return make_state(0), [make_state(i) for i in (1, 2, 3)]


def test_lambda_zero_gives_pretrained(pool):
    pre, fts = pool
    assert_state_dict_close(task_arithmetic(pre, fts, 0.0), pre)


def test_identical_experts_give_that_expert(pool):
    pre, fts = pool
    same = [fts[0]] * 4
    assert_state_dict_close(simple_average(pre, same), {**fts[0], "pos_ids": pre["pos_ids"]})


def test_simple_average_is_mean(pool):
    pre, fts = pool
    out = simple_average(pre, fts)
    for key in ("a.weight", "a.bias"):
        torch.testing.assert_close(out[key], torch.stack([f[key] for f in fts]).mean(0))
    assert torch.equal(out["pos_ids"], pre["pos_ids"])


def test_task_arithmetic_closed_form(pool):
    pre, fts = pool
    out = task_arithmetic(pre, fts, 0.4)
    expected = pre["a.weight"] + 0.4 * sum(f["a.weight"] - pre["a.weight"] for f in fts)
    torch.testing.assert_close(out["a.weight"], expected)


def test_per_model_lambda_and_average_equivalence(pool):
    pre, fts = pool
    assert_state_dict_close(task_arithmetic(pre, fts, [1 / 3] * 3), simple_average(pre, fts))
    only_first = task_arithmetic(pre, fts, [1.0, 0.0, 0.0])
    assert_state_dict_close(only_first, {**fts[0], "pos_ids": pre["pos_ids"]})
    with pytest.raises(FusionBenchError, match="one per expert"):
        task_arithmetic(pre, fts, [0.3, 0.3])


def test_exclude_keys_copied_from_pretrained(pool):
    pre, fts = pool
    out = task_arithmetic(pre, fts, 1.0, exclude_keys=["*.bias"])
    assert torch.equal(out["a.bias"], pre["a.bias"])
    assert not torch.equal(out["a.weight"], pre["a.weight"])


def test_fp16_inputs_merge_in_fp32(pool):
    pre, fts = pool
    half = [{k: v.half() if v.is_floating_point() else v for k, v in f.items()} for f in fts]
    out = add_weighted_task_vectors(pre, half, [0.5, 0.5, 0.5])
    assert out["a.weight"].dtype == torch.float32


def test_shape_mismatch_is_a_clear_error(pool):
    pre, fts = pool
    bad = {**fts[0], "a.weight": torch.zeros(4, 4)}
    with pytest.raises(FusionBenchError, match="same architecture"):
        task_arithmetic(pre, [bad], 0.3, names=["bad"])
    with pytest.raises(FusionBenchError, match="different architecture"):
        check_same_architecture(pre, bad, "bad")
    missing = {k: v for k, v in fts[0].items() if k != "a.bias"}
    with pytest.raises(FusionBenchError, match="lacks"):
        check_same_architecture(pre, missing, "missing")
