"""Closed-form oracles for the streaming linear merges and the TIES / DARE building blocks."""

from __future__ import annotations

import math

import pytest
import torch

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.dare import dare_drop, key_seed
from fusion_bench.method.simple_average import SimpleAverage
from fusion_bench.method.task_arithmetic import TaskArithmetic
from fusion_bench.method.ties_merging import (
    DisjointMerge,
    agrees,
    elect_sign,
    majority_sign,
    resolve_zero_signs,
    ties_keep_rank,
    trim,
)
from fusion_bench.tensor_ops import (
    add_weighted_task_vectors,
    check_same_architecture,
    kth_smallest_magnitude,
)
from fusion_bench.testing import as_experts, assert_state_dict_close


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
    assert_state_dict_close(TaskArithmetic(scaling_factor=0.0).merge(pre, as_experts(fts)), pre)


def test_identical_experts_give_that_expert(pool):
    pre, fts = pool
    same = as_experts([fts[0]] * 4)
    assert_state_dict_close(SimpleAverage().merge(pre, same), {**fts[0], "pos_ids": pre["pos_ids"]})


def test_simple_average_is_mean(pool):
    pre, fts = pool
    out = SimpleAverage().merge(pre, as_experts(fts))
    for key in ("a.weight", "a.bias"):
        torch.testing.assert_close(out[key], torch.stack([f[key] for f in fts]).mean(0))
    assert torch.equal(out["pos_ids"], pre["pos_ids"])


def test_task_arithmetic_closed_form(pool):
    pre, fts = pool
    out = TaskArithmetic(scaling_factor=0.4).merge(pre, as_experts(fts))
    expected = pre["a.weight"] + 0.4 * sum(f["a.weight"] - pre["a.weight"] for f in fts)
    torch.testing.assert_close(out["a.weight"], expected)


def test_per_model_lambda_and_average_equivalence(pool):
    pre, fts = pool
    experts = as_experts(fts)
    assert_state_dict_close(
        TaskArithmetic(scaling_factor=[1 / 3] * 3).merge(pre, experts),
        SimpleAverage().merge(pre, experts),
    )
    only_first = TaskArithmetic(scaling_factor=[1.0, 0.0, 0.0]).merge(pre, experts)
    assert_state_dict_close(only_first, {**fts[0], "pos_ids": pre["pos_ids"]})
    with pytest.raises(FusionBenchError, match="one per expert"):
        TaskArithmetic(scaling_factor=[0.3, 0.3]).merge(pre, experts)


def test_exclude_keys_copied_from_pretrained(pool):
    pre, fts = pool
    out = TaskArithmetic(scaling_factor=1.0, exclude_keys=["*.bias"]).merge(pre, as_experts(fts))
    assert torch.equal(out["a.bias"], pre["a.bias"])
    assert not torch.equal(out["a.weight"], pre["a.weight"])


def test_fp16_inputs_merge_in_fp32(pool):
    pre, fts = pool
    half = [{k: v.half() if v.is_floating_point() else v for k, v in f.items()} for f in fts]
    out = add_weighted_task_vectors(pre, as_experts(half), [0.5, 0.5, 0.5])
    assert out["a.weight"].dtype == torch.float32


def test_shape_mismatch_is_a_clear_error(pool):
    pre, fts = pool
    bad = {**fts[0], "a.weight": torch.zeros(4, 4)}
    with pytest.raises(FusionBenchError, match="same architecture"):
        TaskArithmetic(scaling_factor=0.3).merge(pre, {"bad": bad})
    with pytest.raises(FusionBenchError, match="different architecture"):
        check_same_architecture(pre, bad, "bad")
    missing = {k: v for k, v in fts[0].items() if k != "a.bias"}
    with pytest.raises(FusionBenchError, match="lacks"):
        check_same_architecture(pre, missing, "missing")


# --- TIES / DARE building blocks ---------------------------------------------------------------
def test_kth_magnitude_is_exact_over_chunks():
    g = torch.Generator().manual_seed(0)
    chunks = [
        torch.randn(7, 5, generator=g) * 1e-3,
        torch.randn(11, generator=g) * 10,
        torch.tensor([0.0, -0.0, 2.5, -2.5, 2.5, 1e-30, -3e30]),  # zeros, duplicates, extremes
        torch.randn(3, 4, generator=g).half(),  # any float dtype, compared in float32
    ]
    flat = torch.cat([c.float().abs().reshape(-1) for c in chunks])
    for rank in (1, 2, 5, 17, len(flat) // 2, len(flat) - 1, len(flat)):
        expected = flat.kthvalue(rank).values
        assert torch.equal(kth_smallest_magnitude(lambda: iter(chunks), rank), expected), rank
    with pytest.raises(ValueError):
        kth_smallest_magnitude(lambda: iter(chunks), len(flat) + 1)


def test_kth_magnitude_separates_values_sharing_high_bits():
    # 1.0 and its next float share the high 16 bits: only the second (low-bits) pass tells them
    one = torch.tensor([1.0])
    nxt = torch.nextafter(one, torch.tensor([2.0]))
    chunks = [torch.cat([nxt, one, -nxt])]
    assert kth_smallest_magnitude(lambda: iter(chunks), 1).item() == 1.0
    assert torch.equal(kth_smallest_magnitude(lambda: iter(chunks), 2).reshape(1), nxt)


def test_ties_keep_rank_matches_reference_and_keeps_ceil_kd():
    # reference: kthvalue(d - int(d*k)); |τ| >= it keeps d - rank + 1 entries (distinct |τ|)
    for d, k in ((48, 20), (1000, 20), (7, 50), (10, 33)):
        rank = ties_keep_rank(d, k)
        assert rank == d - int(d * k / 100)
        if (d * k) % 100:  # k·d not an integer: exactly ⌈k·d⌉ kept
            assert d - rank + 1 == math.ceil(d * k / 100)
    assert ties_keep_rank(50, 20) == 40  # k·d = 10 integer: the reference keeps 11
    assert ties_keep_rank(48, 100) == 1  # keep everything (the reference code fails here)
    with pytest.raises(FusionBenchError, match="percent"):
        ties_keep_rank(48, 120)


def test_trim_keeps_entries_equal_to_threshold():
    tau = torch.tensor([0.1, -0.5, 0.5, 0.3, -0.05])
    assert torch.equal(trim(tau, torch.tensor(0.5)), torch.tensor([0.0, -0.5, 0.5, 0.0, 0.0]))
    g = torch.Generator().manual_seed(1)
    tau = torch.randn(48, generator=g)  # distinct magnitudes
    kth = kth_smallest_magnitude(lambda: [tau], ties_keep_rank(48, 20))
    assert int((trim(tau, kth) != 0).sum()) == math.ceil(0.2 * 48)


def test_sign_election_and_disjoint_merge_by_hand():
    trimmed = [torch.tensor([1.0, 2.0, 0.0, 3.0, 0.5]), torch.tensor([-3.0, 1.0, 0.0, -3.0, 0.0])]
    signs = elect_sign(trimmed[0] + trimmed[1])
    assert signs.tolist() == [-1.0, 1.0, 0.0, 0.0, 1.0]
    assert majority_sign(float(signs.sum())) == 1.0 and majority_sign(0.0) == 0.0
    resolved = resolve_zero_signs(signs, 1.0)
    assert resolved.tolist() == [-1.0, 1.0, 1.0, 1.0, 1.0]
    expected = {
        "sum": [-3.0, 3.0, 0.0, 3.0, 0.5],
        "mean": [-3.0, 1.5, 0.0, 3.0, 0.5],
        "max": [-3.0, 2.0, 0.0, 3.0, 0.5],
    }
    for func, values in expected.items():
        merger = DisjointMerge(resolved, func)
        for t in trimmed:
            merger.add(t)
        assert torch.equal(merger.signs(), signs)
        assert merger.result(resolved).tolist() == values, func
        direct = [  # the reference's two-pass form: keep the agreeing entries, then reduce
            torch.where(agrees(t, resolved), t, torch.zeros_like(t)) for t in trimmed
        ]
        stacked = torch.stack(direct)
        if func == "sum":
            assert merger.result(resolved).tolist() == stacked.sum(0).tolist()
        part = merger.select(torch.tensor([1, 3]))
        assert part.result(resolved[[1, 3]]).tolist() == [values[1], values[3]], func
    with pytest.raises(FusionBenchError, match="merge_func"):
        DisjointMerge(resolved, "median")


def test_key_seed_is_stable_and_distinct():
    assert key_seed(0, 1, "a.weight") == key_seed(0, 1, "a.weight")
    seeds = {key_seed(s, i, k) for s in (0, 1) for i in (0, 1) for k in ("a", "b")}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds)


def test_dare_drop_rate_rescale_and_reproducibility():
    tau = torch.ones(20000)
    out = dare_drop(tau, 0.3, True, torch.Generator().manual_seed(5))
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.02
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.7))
    assert torch.equal(out, dare_drop(tau, 0.3, True, torch.Generator().manual_seed(5)))
    assert torch.equal(dare_drop(tau, 0.3, False, torch.Generator().manual_seed(5)), kept.float())
    assert torch.equal(dare_drop(tau, 0.0, True, torch.Generator()), tau)
    with pytest.raises(FusionBenchError, match="sparsity_ratio"):
        dare_drop(tau, 1.0, True, torch.Generator())


def test_kth_smallest_magnitude_on_large_chunks_matches_kthvalue():
    # chunks above the bincount threshold (2^18 entries) and small ones, with repeated values
    g = torch.Generator().manual_seed(11)
    big = torch.randn(300_000, generator=g).round(decimals=3)
    small = torch.randn(1000, generator=g)
    flat = torch.cat([big, small]).abs()
    for rank in (1, 1234, 150_000, flat.numel()):
        kth = kth_smallest_magnitude(lambda: [big, small], rank)
        assert kth.item() == flat.kthvalue(rank).values.item()
