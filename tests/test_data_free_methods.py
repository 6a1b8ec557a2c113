"""Closed-form oracles for the data-free elementwise merges (weighted average, TIES, DARE, MagMax,
Model Stock) and one CLI run of each on the tiny open_clip pool."""

from __future__ import annotations

import math

import pytest
import torch

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.dare import Dare, DroppedExpert, is_linear_weight
from fusion_bench.method.magmax import MagMax
from fusion_bench.method.model_stock import ModelStock
from fusion_bench.method.simple_average import SimpleAverage
from fusion_bench.method.task_arithmetic import TaskArithmetic
from fusion_bench.method.ties_merging import TiesMerging, ties_thresholds, ties_trim_and_elect
from fusion_bench.method.weighted_average import WeightedAverage, weights_in_order
from fusion_bench.testing import as_experts, assert_state_dict_close
from tests.test_cli import run_cli

FLOAT_KEYS = ("a.weight", "a.bias", "b.weight")


def make_state(seed: int, scale: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": scale * torch.randn(5, 7, generator=g),  # 35
        "a.bias": scale * torch.randn(5, generator=g),  # 5
        "b.weight": scale * torch.randn(8, generator=g),  # 8 -> d = 48 (20% of 48 = 9.6)
        "pos_ids": torch.arange(4),  # integer buffer: copied from θ0
    }


def expert_of(pre: dict, tau: dict) -> dict:
    return {k: pre[k] + tau[k] if k in tau else pre[k].clone() for k in pre}


@pytest.fixture
def pool():
    pre = make_state(0)
    return pre, [expert_of(pre, make_state(i, 0.1)) for i in (1, 2, 3)]


def with_pos(state: dict, pre: dict) -> dict:
    return {**state, "pos_ids": pre["pos_ids"]}


# --- a dense re-statement of the reference TIES on the flattened model (the oracle) ------------
def dense_ties(pre, fts, scaling_factor, threshold, merge_func):
    flat = torch.stack([torch.cat([(f[k] - pre[k]).reshape(-1) for k in FLOAT_KEYS]) for f in fts])
    n, d = flat.shape
    kth = flat.abs().kthvalue(max(1, d - int(d * threshold / 100)), dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= kth)
    signs = torch.sign(trimmed.sum(0))
    signs[signs == 0] = torch.sign(signs.sum())
    selected = trimmed * torch.where(signs > 0, trimmed > 0, trimmed < 0)
    if merge_func == "sum":
        merged = selected.sum(0)
    elif merge_func == "mean":
        merged = selected.sum(0) / (selected != 0).sum(0).clamp(min=1)
    else:
        merged = selected.abs().max(0).values * signs
    out, start = {"pos_ids": pre["pos_ids"]}, 0
    for k in FLOAT_KEYS:
        size = pre[k].numel()
        out[k] = pre[k] + scaling_factor * merged[start : start + size].view_as(pre[k])
        start += size
    return out


# --- weighted average --------------------------------------------------------------------------
def test_weighted_average_oracles(pool):
    pre, fts = pool
    experts = as_experts(fts)
    assert_state_dict_close(
        WeightedAverage(weights=[2.0, 2.0, 2.0]).merge(pre, experts),
        SimpleAverage().merge(pre, experts),
    )
    out = WeightedAverage(weights=[1.0, 2.0, 3.0]).merge(pre, experts)
    expected = sum(w * f["a.weight"] for w, f in zip((1 / 6, 2 / 6, 3 / 6), fts, strict=True))
    torch.testing.assert_close(out["a.weight"], expected)
    unnormalized = WeightedAverage(weights=[0.5, 0.5, 0.5], normalize=False)
    raw = unnormalized.merge(pre, experts)  # FusionBench: Σ w θ
    torch.testing.assert_close(raw["a.bias"], 0.5 * sum(f["a.bias"] for f in fts))
    assert torch.equal(raw["pos_ids"], pre["pos_ids"])
    assert weights_in_order({"y": 2, "x": 1}, ["x", "y"]) == [1.0, 2.0]
    with pytest.raises(FusionBenchError, match="one weight per expert"):
        WeightedAverage(weights=[1.0, 2.0]).merge(pre, experts)
    with pytest.raises(FusionBenchError, match="has no weight for"):
        weights_in_order({"x": 1}, ["x", "y"])
    with pytest.raises(FusionBenchError, match="needs method.weights"):
        weights_in_order(None, ["x"])


# --- TIES --------------------------------------------------------------------------------------
@pytest.mark.parametrize("merge_func", ["sum", "mean", "max"])
@pytest.mark.parametrize("threshold", [20, 50])
def test_ties_equals_dense_reference(pool, merge_func, threshold):
    pre, fts = pool
    ties = TiesMerging(scaling_factor=0.7, threshold=threshold, merge_func=merge_func)
    out = ties.merge(pre, as_experts(fts))
    assert_state_dict_close(out, dense_ties(pre, fts, 0.7, threshold, merge_func))


@pytest.mark.parametrize("merge_func", ["sum", "mean", "max"])
def test_ties_equals_dense_reference_with_many_tied_magnitudes(merge_func):
    # Task-vector entries from a handful of values: many entries tie with each threshold and many
    # signed sums cancel exactly, the cases where a streaming threshold or a one-pass disjoint
    # merge could go wrong.
    pre = make_state(0)
    g = torch.Generator().manual_seed(7)
    levels = torch.tensor([-0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3])
    fts = []
    for _ in range(4):
        tau = {k: levels[torch.randint(0, 7, pre[k].shape, generator=g)] for k in FLOAT_KEYS}
        fts.append(expert_of(pre, tau))
    for threshold in (10, 20, 50, 100):
        ties = TiesMerging(scaling_factor=1.0, threshold=threshold, merge_func=merge_func)
        out = ties.merge(pre, as_experts(fts))
        assert_state_dict_close(out, dense_ties(pre, fts, 1.0, threshold, merge_func))


def test_ties_lambda_zero_and_identical_experts(pool):
    pre, fts = pool
    assert_state_dict_close(TiesMerging(scaling_factor=0.0).merge(pre, as_experts(fts)), pre)
    ties = TiesMerging(scaling_factor=1.0, threshold=100, merge_func="mean")
    same = ties.merge(pre, as_experts([fts[0]] * 4))
    assert_state_dict_close(same, with_pos(fts[0], pre))


def test_ties_top100_without_conflicts_is_task_arithmetic_or_average():
    pre = make_state(0)
    positive = [
        expert_of(pre, {k: v.abs() for k, v in make_state(i, 0.1).items() if k in FLOAT_KEYS})
        for i in (1, 2, 3)
    ]
    experts = as_experts(positive)
    assert_state_dict_close(
        TiesMerging(scaling_factor=0.4, threshold=100, merge_func="sum").merge(pre, experts),
        TaskArithmetic(scaling_factor=0.4).merge(pre, experts),
    )
    assert_state_dict_close(
        TiesMerging(scaling_factor=1.0, threshold=100, merge_func="mean").merge(pre, experts),
        SimpleAverage().merge(pre, experts),
    )


def test_ties_global_threshold_and_kept_count(pool):
    pre, fts = pool
    d = sum(pre[k].numel() for k in FLOAT_KEYS)  # 48: 20% = 9.6
    thresholds = ties_thresholds(pre, as_experts(fts), 20)
    for f, kth in zip(fts, thresholds, strict=True):
        flat = torch.cat([(f[k] - pre[k]).reshape(-1) for k in FLOAT_KEYS]).abs()
        assert torch.equal(kth, flat.kthvalue(d - int(d * 0.2)).values)  # one global value
        assert int((flat >= kth).sum()) == math.ceil(0.2 * d)
    single = ties_trim_and_elect(pre, as_experts(fts[:1]), 20)[0]  # one expert: nothing disagrees
    assert sum(int((v != 0).sum()) for v in single.values()) == math.ceil(0.2 * d)
    assert set(single) == set(FLOAT_KEYS)  # mergeable keys only


def test_ties_exact_cancellation_takes_majority_sign():
    # entry 0 of "b.weight": +0.5 and -0.5 cancel; the other entries elect + (majority +)
    pre = {"b.weight": torch.zeros(6), "pos_ids": torch.arange(2)}
    t1 = {"b.weight": torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0, 5.0])}
    t2 = {"b.weight": torch.tensor([-0.5, 1.0, 2.0, 3.0, 4.0, 5.0])}
    fts = as_experts([expert_of(pre, t1), expert_of(pre, t2)])
    for func, first in (("sum", 0.5), ("mean", 0.5), ("max", 0.5)):
        out = TiesMerging(scaling_factor=1.0, threshold=100, merge_func=func).merge(pre, fts)
        assert out["b.weight"][0].item() == first, func
    minus = as_experts([expert_of(pre, {"b.weight": -t["b.weight"]}) for t in (t1, t2)])
    ties_sum = TiesMerging(scaling_factor=1.0, threshold=100, merge_func="sum")
    assert ties_sum.merge(pre, minus)["b.weight"][0].item() == -0.5
    kept = ties_trim_and_elect(pre, fts, 100)
    assert kept[0]["b.weight"][0].item() == 0.5 and kept[1]["b.weight"][0].item() == 0.0


def test_ties_trim_and_elect_sums_to_the_merge(pool):
    pre, fts = pool
    experts = as_experts(fts)
    kept = ties_trim_and_elect(pre, experts, 20)
    expected = {k: pre[k] + 0.3 * sum(v[k] for v in kept) for k in FLOAT_KEYS}
    out = TiesMerging(scaling_factor=0.3, threshold=20, merge_func="sum").merge(pre, experts)
    assert_state_dict_close(out, with_pos(expected, pre))


def test_ties_bad_options_are_clear_errors():
    with pytest.raises(FusionBenchError, match="merge_func"):
        TiesMerging(merge_func="avg")
    with pytest.raises(FusionBenchError, match="percent"):
        TiesMerging(threshold=-1)


# --- DARE --------------------------------------------------------------------------------------
BASES = {
    "simple_average": SimpleAverage(),
    "task_arithmetic": TaskArithmetic(scaling_factor=0.3),
    "ties_merging": TiesMerging(scaling_factor=0.3, threshold=20, merge_func="sum"),
    "magmax": MagMax(scaling_factor=0.5),  # any data-free merge is a base
}
BASE_OPTIONS = {
    "simple_average": {},
    "task_arithmetic": {"scaling_factor": 0.3},
    "ties_merging": {"scaling_factor": 0.3, "threshold": 20, "merge_func": "sum"},
    "magmax": {"scaling_factor": 0.5},
}


def dare(base: str, **settings) -> Dare:
    return Dare(base=base, base_options=BASE_OPTIONS[base], **settings)


@pytest.mark.parametrize("base", list(BASES))
def test_dare_p0_is_the_base_method(pool, base):
    pre, fts = pool
    experts = as_experts(fts)
    out = dare(base, sparsity_ratio=0.0).merge(pre, experts)
    assert_state_dict_close(out, BASES[base].merge(pre, experts), atol=0, rtol=0)


@pytest.mark.parametrize("base", ["simple_average", "task_arithmetic"])
def test_dare_mean_over_seeds_tends_to_the_base(pool, base):
    """E[drop(τ)] = τ and the bases are linear in τ: the mean over seeds converges to the base, and
    its error is that of independent Bernoulli(1 − p) masks: per entry the merge's variance is
    w² Σ_i τ_i² p/(1 − p) (w: the base's weight of each τ), divided by the number of seeds."""
    pre, fts = pool
    experts = as_experts(fts)
    seeds, p = 300, 0.5
    runs = [dare(base, sparsity_ratio=p, seed=s).merge(pre, experts) for s in range(seeds)]
    mean = {k: torch.stack([r[k] for r in runs]).mean(0) for k in FLOAT_KEYS}
    expected = BASES[base].merge(pre, experts)
    assert_state_dict_close(with_pos(mean, pre), expected, atol=0.02, rtol=0)
    w = 0.3 if base == "task_arithmetic" else 1 / len(fts)
    errors, sds = [], []
    for k in FLOAT_KEYS:
        variance = torch.stack([f[k] - pre[k] for f in fts]).pow(2).sum(0) * p / (1 - p)
        errors.append((mean[k] - expected[k]).reshape(-1))
        sds.append((w * variance.sqrt() / seeds**0.5).reshape(-1))
    z = torch.cat(errors) / torch.cat(sds)
    assert 0.7 < z.pow(2).mean().sqrt() < 1.3  # standardised errors: RMS ≈ 1 (48 entries)
    assert z.mean().abs() < 0.5  # no bias


def test_dare_drop_rate_and_rescale_per_expert(pool):
    pre, fts = pool
    settings = Dare(sparsity_ratio=0.5, seed=3)
    view = DroppedExpert(pre, fts[0], 0, settings, "#0")
    tau = torch.cat([(fts[0][k] - pre[k]).reshape(-1) for k in FLOAT_KEYS])
    kept = torch.cat([(view[k] - pre[k]).reshape(-1) for k in FLOAT_KEYS])
    nz = kept != 0
    assert 0.3 < nz.float().mean() < 0.7  # 48 entries, p = 0.5
    torch.testing.assert_close(kept[nz], 2 * tau[nz], rtol=1e-5, atol=1e-6)
    unscaled = DroppedExpert(pre, fts[0], 0, Dare(sparsity_ratio=0.5, seed=3, rescale=False), "")
    torch.testing.assert_close(
        unscaled["a.weight"] - pre["a.weight"], (view["a.weight"] - pre["a.weight"]) / 2
    )
    assert torch.equal(view["pos_ids"], fts[0]["pos_ids"])


def test_dare_only_on_linear_weights_drops_the_weight_matrices_only(pool):
    pre, fts = pool
    view = DroppedExpert(pre, fts[0], 0, Dare(only_on_linear_weights=True), "#0")
    assert torch.equal(view["a.bias"], fts[0]["a.bias"])  # 1-D: kept whole
    assert torch.equal(view["b.weight"], fts[0]["b.weight"])  # 1-D weight (a LayerNorm's)
    dropped = view["a.weight"] - pre["a.weight"]
    assert (dropped == 0).any() and not torch.equal(view["a.weight"], fts[0]["a.weight"])
    for key, expected in {
        "encoder.layers.0.self_attn.q_proj.weight": True,  # Hugging Face CLIP
        "encoder.layers.0.mlp.fc1.weight": True,
        "embeddings.position_embedding.weight": False,  # nn.Embedding
        "transformer.resblocks.0.mlp.c_fc.weight": True,  # open_clip
        "transformer.resblocks.0.attn.out_proj.weight": True,
        "transformer.resblocks.0.attn.in_proj_weight": False,  # MultiheadAttention's parameter
        "proj": False,
        "positional_embedding": False,
    }.items():
        assert is_linear_weight(key, torch.zeros(4, 4)) is expected, key
    assert not is_linear_weight("conv1.weight", torch.zeros(4, 3, 2, 2))
    assert not is_linear_weight("ln_pre.weight", torch.zeros(4))


def test_dare_is_reproducible_and_order_free(pool):
    pre, fts = pool
    experts = as_experts(fts)

    def run(pretrained, seed):
        return dare("ties_merging", sparsity_ratio=0.5, seed=seed).merge(pretrained, experts)

    a = run(pre, 3)
    assert_state_dict_close(run(pre, 3), a, atol=0, rtol=0)
    assert not torch.equal(run(pre, 4)["a.weight"], a["a.weight"])
    reversed_pre = dict(reversed(list(pre.items())))  # keys visited in another order
    assert_state_dict_close(run(reversed_pre, 3), a, atol=0, rtol=0)


def test_dare_ties_uses_the_dropped_vectors(pool):
    pre, fts = pool
    settings = dare("ties_merging", sparsity_ratio=0.5, rescale=True, seed=7)
    experts = as_experts(fts)
    dropped = [
        dict(DroppedExpert(pre, f, i, settings, name).items())
        for i, (name, f) in enumerate(experts.items())
    ]
    for k in FLOAT_KEYS:  # about half of each task vector is dropped, survivors are ×2
        tau, kept = fts[0][k] - pre[k], dropped[0][k] - pre[k]
        nz = kept.abs() > 1e-6
        torch.testing.assert_close(kept[nz], 2 * tau[nz])
    assert_state_dict_close(
        settings.merge(pre, experts),
        dense_ties(pre, dropped, 0.3, 20, "sum"),
        atol=1e-6,
    )


def test_dare_presets_are_fusionbench_defaults():
    from fusion_bench.api import build_method

    ta, _ = build_method("dare_task_arithmetic", {})
    assert ta.base_method() == TaskArithmetic(scaling_factor=0.3)
    ties, _ = build_method("dare_ties_merging", {})
    assert ties.base_method() == TiesMerging(scaling_factor=0.5, threshold=20, merge_func="sum")
    for method in (ta, ties):
        assert (method.sparsity_ratio, method.rescale, method.only_on_linear_weights) == (
            0.5,
            True,
            False,
        )


def test_dare_bad_options_are_clear_errors():
    with pytest.raises(FusionBenchError, match="method.base='nope'"):
        Dare(base="nope")
    with pytest.raises(FusionBenchError, match="data-free merge"):
        Dare(base="regmean")
    with pytest.raises(FusionBenchError, match="method.base='task_arithmetic'.*thresold"):
        Dare(base_options={"thresold": 20})
    with pytest.raises(FusionBenchError, match="merge_func"):
        Dare(base="ties_merging", base_options={"merge_func": "avg"})
    with pytest.raises(FusionBenchError, match="sparsity_ratio"):
        Dare(sparsity_ratio=1.0)


# --- MagMax ------------------------------------------------------------------------------------
def test_magmax_picks_the_largest_magnitude():
    pre = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0]), "pos_ids": torch.arange(2)}
    taus = [torch.tensor([0.1, -0.9, 0.0, 0.5]), torch.tensor([-0.3, 0.2, 0.0, -0.5])]
    fts = [expert_of(pre, {"w": t}) for t in taus]
    out = MagMax(scaling_factor=0.5).merge(pre, as_experts(fts))
    torch.testing.assert_close(out["w"], 1.0 + 0.5 * torch.tensor([-0.3, -0.9, 0.0, 0.5]))
    assert_state_dict_close(MagMax(scaling_factor=0.0).merge(pre, as_experts(fts)), pre)
    assert_state_dict_close(MagMax(scaling_factor=1.0).merge(pre, as_experts([fts[1]] * 3)), fts[1])


# --- Model Stock -------------------------------------------------------------------------------
def test_model_stock_closed_form_two_experts():
    pre = {"w": torch.tensor([1.0, 2.0]), "v": torch.tensor([0.0, 0.0]), "n": torch.arange(2)}
    fts = [
        expert_of(pre, {"w": torch.tensor([1.0, 0.0]), "v": torch.tensor([1.0, 0.0])}),
        expert_of(pre, {"w": torch.tensor([1.0, 1.0]), "v": torch.tensor([0.0, 1.0])}),
    ]
    out = ModelStock().merge(pre, as_experts(fts))
    cos = 1 / math.sqrt(2)
    t = 2 * cos / (1 + cos)  # k = 2
    torch.testing.assert_close(out["w"], pre["w"] + t * torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(out["v"], pre["v"])  # orthogonal task vectors: t = 0
    assert torch.equal(out["n"], pre["n"])
    identical = ModelStock().merge(pre, as_experts([fts[0]] * 3))
    assert_state_dict_close(identical, fts[0])  # identical: t = 1


def test_model_stock_averages_pair_angles():
    pre = {"w": torch.zeros(2)}
    taus = [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0])]
    out = ModelStock().merge(pre, as_experts([{"w": t} for t in taus]))
    angle = (math.pi / 4 + math.pi / 2 + math.pi / 4) / 3  # mean of the three pair angles
    t = 3 * math.cos(angle) / (1 + 2 * math.cos(angle))
    torch.testing.assert_close(out["w"], t * torch.stack(taus).mean(0))
    with pytest.raises(FusionBenchError, match="at least 2"):
        ModelStock().merge(pre, as_experts([{"w": taus[0]}]))


# --- each method from the CLI ------------------------------------------------------------------
CLI_METHODS = {
    "weighted_average": ["method.weights=[1,3]"],
    "ties_merging": [],
    "dare": ["method.base=ties_merging"],
    "magmax": [],
    "model_stock": [],
    "tsv_m": [],
    "iso_c": [],
}


@pytest.mark.parametrize("method", list(CLI_METHODS))
def test_method_runs_from_the_cli(method, open_clip_cli_args, tmp_path, capsys):
    code, out, err = run_cli(
        [
            *open_clip_cli_args,
            f"method={method}",
            *CLI_METHODS[method],
            "logger=none",
            "fast_dev_run=true",
            f"hydra.run.dir={tmp_path}",
        ],
        capsys,
    )
    assert code == 0, err
    assert f"== {method} ==" in out


def _merge_methods_with_exclude_keys() -> list[str]:
    from fusion_bench.api import method_config
    from fusion_bench.paths import config_dir

    directory = config_dir() / "method"
    names = sorted(str(p.relative_to(directory).with_suffix("")) for p in directory.rglob("*.yaml"))
    names = [n for n in names if "exclude_keys" in method_config(n)]
    return [n for n in names if method_class(n).kind in ("merge", "sequential")]  # data-free


def method_class(name: str) -> type:
    import importlib

    from fusion_bench.api import method_config

    module, _, cls = method_config(name)["_target_"].rpartition(".")
    return getattr(importlib.import_module(module), cls)


@pytest.mark.parametrize("name", _merge_methods_with_exclude_keys())
def test_excluded_keys_come_back_in_float32_like_merged_ones(name):
    """Docs: a merge returns float32 tensors. A half-precision checkpoint's excluded keys were
    returned in fp16 (copied as stored) while every merged key was float32."""
    import fusion_bench
    from fusion_bench.api import build_method
    from tests.test_method_contract import required

    g = torch.Generator().manual_seed(0)
    pre = {"a.weight": torch.randn(6, 4, generator=g).half(), "b.weight": torch.randn(5, 3).half()}
    pre["ids"] = torch.arange(3)
    experts = [
        {
            k: (v + 0.1 * torch.randn(v.shape, generator=g).half()) if v.is_floating_point() else v
            for k, v in pre.items()
        }
        for _ in range(2)
    ]
    method, _ = build_method(name, {**required(name), "exclude_keys": ["b.*"]})
    out = fusion_bench.merge(method, pre, experts)
    assert out["b.weight"].dtype == torch.float32 and out["a.weight"].dtype == torch.float32
    assert torch.equal(out["b.weight"], pre["b.weight"].float())  # excluded: θ0 exactly
    assert out["ids"].dtype == torch.int64
