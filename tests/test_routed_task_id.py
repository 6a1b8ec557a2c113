"""EMR-Merging and TALL masks (the per-task, task-id methods of fusion_bench.method.routed) against
dense float64 re-statements of the authors' code, and their closed-form special cases."""

from __future__ import annotations

import json
from collections.abc import Mapping

import pytest
import torch

import fusion_bench
from fusion_bench.api import StateDictPool, build_method
from fusion_bench.errors import FusionBenchError
from fusion_bench.method.routed.emr_merging import EMRMerging, elect
from fusion_bench.method.routed.tall_masks import TallMasks
from fusion_bench.testing import assert_state_dict_close
from tests.conftest import TASKS
from tests.test_cli import run_cli
from tests.test_consensus_pcb import dense_ties

FLOAT_KEYS = ("w", "b", "ln.weight")


def make_state(seed: int, scale: float = 1.0, grid: bool = False, size: int = 768) -> dict:
    """A ViT-sized linear layer, its bias, a layer-norm gain, an integer buffer. ``grid``: values
    on a dyadic grid (multiples of 2⁻¹⁰ · scale), so every float32 sum, difference and product
    by 1/4 or 1/2 below is exact and float32 results equal the float64 reference bit for bit."""
    g = torch.Generator().manual_seed(seed)

    def draw(*shape):
        if grid:
            return torch.randint(-32, 33, shape, generator=g).float() * (scale / 1024)
        return scale * torch.randn(*shape, generator=g)

    return {
        "w": draw(size, size),
        "b": draw(size),
        "ln.weight": (1.0 if scale == 1.0 else 0.0) + draw(size),
        "pos_ids": torch.arange(4),  # integer buffer: copied from θ0
    }


def expert_of(pre: dict, tau: dict) -> dict:
    return {k: pre[k] + tau[k] if pre[k].is_floating_point() else pre[k].clone() for k in pre}


def make_pool(n: int = 4, grid: bool = False, size: int = 768, scale: float = 0.02):
    """θ0 and n experts θ0 + τ_i; ``grid``: a dyadic scale (2⁻⁵), so every θ_i is exact."""
    scale = 2.0**-5 if grid else scale
    pre = make_state(0, grid=grid, size=size)
    experts = {
        f"task{i}": expert_of(pre, make_state(i, scale, grid, size)) for i in range(1, n + 1)
    }
    return pre, experts


def pool_of(pre: dict, experts: dict) -> StateDictPool:
    return StateDictPool(pre, experts, "test")


def models_of(method, pre, experts) -> dict:
    return dict(method.models(pool_of(pre, experts)))


# --- the oracles: the authors' code, dense, in float64 -------------------------------------------
def dense_emr(pre: dict, experts: dict):
    """The authors' ``emr_merge`` (merge_vit/src/main_emr_merging.py) per tensor: flag =
    (mean τ > 0)·2 − 1, masks (τ·flag > 0), τ_uni = flag · running max of |mask·τ|, rescalers =
    Σ_n mean|τ_t| / Σ_n mean|τ_uni ⊙ M_t|; model t = θ0 + τ_uni ⊙ M_t · λ_t."""
    names = list(experts)
    scales, new_scales = torch.zeros(len(names), dtype=torch.float64), torch.zeros(len(names))
    new_scales = new_scales.double()
    unified, masks = {}, {}
    for key in FLOAT_KEYS:
        taus = [experts[n][key].double() - pre[key].double() for n in names]
        flag = (torch.stack(taus).mean(0) > 0).double() * 2 - 1
        param_max = torch.zeros_like(taus[0])
        masks[key] = []
        for m, tau in enumerate(taus):
            mask = (tau * flag) > 0
            masks[key].append(mask)
            param_max = torch.maximum(param_max, (mask * tau).abs())
            scales[m] += tau.abs().mean()
        unified[key] = param_max * flag
    for m in range(len(names)):
        for key in FLOAT_KEYS:
            new_scales[m] += (unified[key] * masks[key][m]).abs().mean()
    rescalers = scales / new_scales
    models = {
        name: {
            **{k: pre[k].double() + unified[k] * masks[k][m] * rescalers[m] for k in FLOAT_KEYS},
            "pos_ids": pre["pos_ids"],
        }
        for m, name in enumerate(names)
    }
    return unified, dict(zip(names, rescalers.tolist(), strict=True)), models


def flat(state: dict) -> torch.Tensor:
    return torch.cat([state[k].double().reshape(-1) for k in FLOAT_KEYS])


def unflat(pre: dict, vector: torch.Tensor) -> dict:
    out, start = {"pos_ids": pre["pos_ids"]}, 0
    for k in FLOAT_KEYS:
        size = pre[k].numel()
        out[k] = vector[start : start + size].view_as(pre[k])
        start += size
    return out


def dense_tall(pre: dict, experts: dict, lambdas: list[float], base: str = "task_arithmetic"):
    """The authors' TALL masks on the flattened model (tall_masks: aggregation.py builds the
    merged vector, tallmask_utils.generate_task_masks the masks, eval.py applies them with
    scaling_coef 1): θ_MTL = θ0 + τ_MTL, m_t = |θ0 − θ_t| > λ_t |θ_MTL − θ_t|, θ0 + m_t ⊙ τ_MTL."""
    ptm = flat(pre)
    ft = torch.stack([flat(e) for e in experts.values()])
    tv = ft - ptm
    merged = tv.sum(0) if base == "task_arithmetic" else dense_ties(tv)
    multi = ptm + merged
    out = {}
    for t, (name, lam) in enumerate(zip(experts, lambdas, strict=True)):
        mask = (ptm - ft[t]).abs() > (multi - ft[t]).abs() * lam
        out[name] = unflat(pre, ptm + merged * mask)
    return out


def assert_exact(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for key in expected:
        assert torch.equal(actual[key], expected[key].to(actual[key].dtype)), key


# --- EMR-Merging ----------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", [True, False])
def test_emr_equals_the_authors_code_restated(grid):
    pre, experts = make_pool(4, grid=grid)
    if grid:  # exact ties: Σ τ_t = 0 somewhere (the authors elect −1 there)
        experts["task4"]["b"][:64] = pre["b"][:64] - (experts["task1"]["b"][:64] - pre["b"][:64])
        experts["task2"]["b"][:64] = experts["task3"]["b"][:64] = pre["b"][:64]
    unified, rescalers, models = dense_emr(pre, experts)
    if grid:
        assert (unified["b"][:64] < 0).sum() > 16  # the ties were elected negative
    got_unified, got_rescalers = elect(pre, experts)
    assert set(got_unified) == set(FLOAT_KEYS)
    for key in FLOAT_KEYS:
        if grid:  # every step is exact
            assert torch.equal(got_unified[key].double(), unified[key]), key
        else:
            torch.testing.assert_close(got_unified[key].double(), unified[key], rtol=0, atol=1e-7)
    assert got_rescalers == pytest.approx(rescalers, rel=1e-9)
    assert all(0.5 < lam < 1.0 for lam in got_rescalers.values())  # mixed signs: masks drop ~30%
    got = models_of(EMRMerging(), pre, experts)
    for name in experts:
        assert_state_dict_close(got[name], models[name], atol=1e-7, rtol=1e-6)


def test_emr_rescalers_keep_each_task_vectors_l1_mass():
    """λ_t is chosen so that Σ_n mean|λ_t M_t ⊙ τ_uni| over the tensors n equals Σ_n mean|τ_t|
    (the authors' per-tensor-mean form of the paper's Σ|τ̂_t| = Σ|τ_t|)."""
    pre, experts = make_pool(5)
    models = models_of(EMRMerging(), pre, experts)
    for name, expert in experts.items():
        own = sum((expert[k].double() - pre[k].double()).abs().mean() for k in FLOAT_KEYS)
        rebuilt = sum((models[name][k].double() - pre[k].double()).abs().mean() for k in FLOAT_KEYS)
        assert float(rebuilt) == pytest.approx(float(own), rel=1e-5)


def test_emr_masks_keep_exactly_the_agreeing_entries():
    """M_t = 1{τ_t ⊙ τ_uni > 0}: task t's model differs from θ0 exactly where τ_t agrees in sign
    with the unified vector, and there by λ_t · τ_uni."""
    pre, experts = make_pool(3, grid=True, size=64)
    models = EMRMerging().models(pool_of(pre, experts))
    for name, expert in experts.items():
        for key in FLOAT_KEYS:
            tau, uni = expert[key] - pre[key], models.unified[key]
            mask = tau * uni > 0
            assert torch.equal(models.mask(name, key), mask)
            delta = models[name][key] - pre[key]
            assert torch.equal(delta != 0, mask)
            torch.testing.assert_close(delta[mask], models.rescalers[name] * uni[mask])


def test_emr_of_one_expert_is_that_expert():
    pre, experts = make_pool(1)
    models = EMRMerging().models(pool_of(pre, experts))
    assert models.rescalers == {"task1": 1.0}
    expected = {
        k: pre[k] + (v - pre[k]) if v.is_floating_point() else v
        for k, v in experts["task1"].items()
    }
    assert_exact(models["task1"], expected)  # θ0 + (θ_1 − θ0) in float32: the expert
    torch.testing.assert_close(models["task1"]["w"], experts["task1"]["w"], rtol=0, atol=1e-7)


def test_emr_of_identical_experts_gives_the_expert_for_every_task():
    pre, experts = make_pool(1)
    same = {name: experts["task1"] for name in ("a", "b", "c")}
    models = EMRMerging().models(pool_of(pre, same))
    assert models.rescalers == {"a": 1.0, "b": 1.0, "c": 1.0}
    expected = {
        k: pre[k] + (v - pre[k]) if v.is_floating_point() else v
        for k, v in experts["task1"].items()
    }
    for name in same:
        assert_exact(models[name], expected)


def test_emr_zero_task_vector_and_excluded_keys():
    pre, experts = make_pool(3, size=16)
    experts["zero"] = {k: v.clone() for k, v in pre.items()}  # θ_t = θ0: λ_t = 0, its model is θ0
    models = EMRMerging(exclude_keys=["ln.*"]).models(pool_of(pre, experts))
    assert models.rescalers["zero"] == 0.0
    assert_exact(models["zero"], pre)
    assert set(models.unified) == {"w", "b"}  # ln.weight: not merged, not in the rescaler sums
    _, rescalers = elect(
        {k: pre[k] for k in ("w", "b")},
        {n: {k: e[k] for k in ("w", "b")} for n, e in experts.items()},
    )
    assert models.rescalers == pytest.approx(rescalers, rel=1e-12)
    for name in experts:
        assert torch.equal(models[name]["ln.weight"], pre["ln.weight"])
        assert torch.equal(models[name]["pos_ids"], pre["pos_ids"])


def test_emr_warns_for_an_expert_that_never_agrees():
    pre = {"w": torch.zeros(2)}
    experts = {"up": {"w": torch.tensor([1.0, 1.0])}, "down": {"w": torch.tensor([-0.5, -0.5])}}
    with pytest.warns(UserWarning, match="'down' agrees with the elected sign nowhere"):
        models = EMRMerging().models(pool_of(pre, experts))
    assert models.rescalers == {"up": 1.0, "down": 0.0}
    assert torch.equal(models["down"]["w"], pre["w"]) and torch.equal(
        models["up"]["w"], experts["up"]["w"]
    )


class CountingExpert(Mapping):
    """An expert that counts the tensors read from it."""

    def __init__(self, state: dict, reads: list):
        self.state, self.reads = state, reads

    def __getitem__(self, key):
        self.reads.append(key)
        return self.state[key]

    def __iter__(self):
        return iter(self.state)

    def __len__(self):
        return len(self.state)

    def __contains__(self, key):
        return key in self.state


@pytest.mark.parametrize("method", [EMRMerging(), TallMasks()])
def test_models_are_built_lazily_reading_only_their_expert(method):
    pre, raw = make_pool(3, size=8)
    reads = {name: [] for name in raw}
    experts = {name: CountingExpert(state, reads[name]) for name, state in raw.items()}
    pool = pool_of(pre, experts)
    for r in reads.values():  # the pool's architecture check
        r.clear()
    models = method.models(pool)
    assert all(sorted(r) == sorted(FLOAT_KEYS) for r in reads.values())  # one pass over each
    for r in reads.values():
        r.clear()
    assert "task2" in models and "other" not in models and list(models) == list(raw)
    assert all(r == [] for r in reads.values())  # membership builds nothing
    models["task2"]
    assert (
        reads["task1"] == []
        and reads["task3"] == []
        and sorted(reads["task2"]) == sorted(FLOAT_KEYS)
    )
    with pytest.raises(KeyError):
        models["other"]


def test_emr_and_tall_costs():
    for method in (EMRMerging(), TallMasks()):
        assert method.stored_models(8) == 2.25 and method.stored_models(32) == 3.0
        assert method.models_held(8) == method.models_held(20) == 1.0


# --- TALL masks -----------------------------------------------------------------------------------
@pytest.mark.parametrize("lambdas", [0.5, [0.25, 0.5, 0.0, 1.0]])
def test_tall_equals_the_authors_code_restated_exactly(lambdas):
    """Dyadic-grid weights: every float32 step is exact, so the masks (strict >, including the
    ties |τ_t| = λ_t |τ_MTL − τ_t| the grid produces) and the models equal the float64 reference."""
    pre, experts = make_pool(4, grid=True)
    per_task = lambdas if isinstance(lambdas, list) else [lambdas] * 4
    expected = dense_tall(pre, experts, per_task)
    got = models_of(TallMasks(tall_mask_lambda=lambdas), pre, experts)
    for name in experts:
        assert_exact(got[name], expected[name])
    # the grid makes boundary ties: a non-strict mask would differ
    ptm, ft = flat(pre), flat(experts["task1"])
    multi = ptm + sum(flat(e) - ptm for e in experts.values())
    assert ((ptm - ft).abs() == (multi - ft).abs() * per_task[0]).sum() > 100


def test_tall_equals_the_reference_on_gaussian_weights():
    """Gaussian weights, λ = 0.4 (not exact in float32): the models equal the float64 reference
    except where an entry sits on the mask's boundary within float32 rounding."""
    pre, experts = make_pool(4)
    expected = dense_tall(pre, experts, [0.4] * 4)
    got = models_of(TallMasks(tall_mask_lambda=0.4), pre, experts)
    ptm = flat(pre)
    multi = ptm + sum(flat(e) - ptm for e in experts.values())
    for name, expert in experts.items():
        ft = flat(expert)
        margin = ((ptm - ft).abs() - (multi - ft).abs() * 0.4).abs()
        differs = (flat(got[name]) - flat(expected[name])).abs() > 1e-6
        assert (margin[differs] < 1e-6).all() and differs.sum() <= 2
        kept = (flat(got[name]) - ptm).abs() > 0
        assert 0.2 < kept.double().mean() < 0.9  # a real mask, neither empty nor full


@pytest.mark.parametrize("k", [1, 2])
def test_tall_on_ties_equals_the_reference(k):
    pre, experts = make_pool(3, size=24)
    expected = dense_tall(pre, experts, [0.4] * 3, base="ties_merging")
    got = models_of(TallMasks(base="ties_merging", tall_mask_lambda=0.4), pre, experts)
    for name in experts:
        assert_state_dict_close(got[name], expected[name], atol=1e-6, rtol=1e-5)


def test_tall_lambda_zero_keeps_every_entry_the_task_changed():
    pre, experts = make_pool(3, size=32)
    for i, expert in enumerate(experts.values()):  # each task leaves some entries at θ0
        expert["w"][i::3] = pre["w"][i::3]
    models = models_of(TallMasks(tall_mask_lambda=0.0), pre, experts)
    multi = {k: pre[k] + sum(e[k] - pre[k] for e in experts.values()) for k in FLOAT_KEYS}
    for name, expert in experts.items():
        for key in FLOAT_KEYS:
            changed = expert[key] != pre[key]
            expected = torch.where(changed, pre[key] + (multi[key] - pre[key]), pre[key])
            torch.testing.assert_close(models[name][key], expected, rtol=0, atol=1e-7)
            assert torch.equal(models[name][key] != pre[key], changed)


def test_tall_of_one_expert_is_that_expert_for_any_lambda():
    pre, experts = make_pool(1, size=32)
    expected = {
        k: pre[k] + (v - pre[k]) if v.is_floating_point() else v
        for k, v in experts["task1"].items()
    }
    for lam in (0.0, 0.6, 5.0):
        assert_exact(models_of(TallMasks(tall_mask_lambda=lam), pre, experts)["task1"], expected)


def test_tall_of_identical_experts_is_all_or_nothing():
    """N identical experts: τ_MTL = N τ and m_t = 1{|τ| > λ (N − 1) |τ|}: every model is θ0 + N τ
    when λ < 1/(N − 1), and θ0 when λ ≥ 1/(N − 1) (strict inequality)."""
    pre, experts = make_pool(1, grid=True, size=32)
    same = {name: experts["task1"] for name in ("a", "b", "c")}  # 1/(N − 1) = 0.5
    tripled = {
        k: pre[k] + 3 * (v - pre[k]) if v.is_floating_point() else v
        for k, v in experts["task1"].items()
    }
    for lam, expected in ((0.25, tripled), (0.5, pre), (0.75, pre)):
        models = models_of(TallMasks(tall_mask_lambda=lam), pre, same)
        for name in same:
            assert_exact(models[name], expected)


def test_tall_exclude_keys_and_base_options():
    pre, experts = make_pool(3, size=16)
    models = models_of(
        TallMasks(base="ties_merging", base_options={"threshold": 50}, exclude_keys=["b"]),
        pre,
        experts,
    )
    for name in experts:
        assert torch.equal(models[name]["b"], pre["b"])
        assert not torch.equal(models[name]["w"], pre["w"])
    dense = dense_tall(pre, experts, [0.6] * 3, base="ties_merging")
    assert not torch.allclose(models["task1"]["w"], dense["task1"]["w"].float())  # threshold used


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"tall_mask_lambda": -0.1}, r"method\.tall_mask_lambda=-0\.1: .* ≥ 0"),
        ({"tall_mask_lambda": [0.3, -1.0]}, r"method\.tall_mask_lambda=\[0\.3, -1\.0\]"),
        ({"tall_mask_lambda": []}, r"method\.tall_mask_lambda=\[\]"),
        ({"tall_mask_lambda": "abc"}, r"method\.tall_mask_lambda='abc'"),
        (
            {"base_options": {"scaling_factor": 0.3}},
            r"method\.base_options sets \['scaling_factor'\]",
        ),
        ({"base": "no_such_merge"}, r"method\.base='no_such_merge'"),
        ({"base": "fisher_merging"}, r"method\.base='fisher_merging' is a data_merge method"),
        (
            {"base": "ties_merging", "base_options": {"threshold": -5}},
            r"method\.base='ties_merging': TIES threshold -5",
        ),
    ],
)
def test_tall_bad_options_are_refused_clearly(options, match):
    with pytest.raises(FusionBenchError, match=match):
        build_method("routed/tall_masks", options)


def test_tall_per_task_lambdas_must_match_the_experts():
    pre, experts = make_pool(3, size=8)
    with pytest.raises(
        FusionBenchError, match=r"method\.tall_mask_lambda=\[0\.2, 0\.4\] has 2 values for 3"
    ):
        TallMasks(tall_mask_lambda=[0.2, 0.4]).models(pool_of(pre, experts))


def test_emr_bad_options_are_refused_clearly():
    with pytest.raises(FusionBenchError, match=r"method\.exclude_keys=3\.5"):
        build_method("routed/emr_merging", {"exclude_keys": 3.5})
    with pytest.raises(FusionBenchError, match="EMR-Merging needs at least one expert"):
        EMRMerging().models(pool_of({"w": torch.zeros(2)}, {}))  # the API refuses earlier


def test_emr_shape_mismatch_is_refused():
    pre = {"w": torch.zeros(2, 2)}
    with pytest.raises(FusionBenchError, match="shape"):
        EMRMerging().models(StateDictPoolUnchecked(pre, {"a": {"w": torch.zeros(3)}}))


class StateDictPoolUnchecked:
    def __init__(self, pre, experts):
        self._pre, self._experts, self.expert_names = pre, experts, list(experts)

    def pretrained(self):
        return self._pre

    def expert(self, name):
        return self._experts[name]


# --- on the tiny CLIP pools -------------------------------------------------------------------------
@pytest.fixture
def taskpool(tiny_datasets):
    from fusion_bench.taskpool.clip_classification import CLIPClassificationTaskPool

    return CLIPClassificationTaskPool(list(TASKS), datasets=tiny_datasets, fast_dev_run=True)


@pytest.mark.parametrize("pool_name", ["open_clip_pool", "hf_pool"])
def test_api_on_the_tiny_pools(pool_name, request, taskpool):
    pool = request.getfixturevalue(pool_name)
    for name, options in (
        ("routed/emr_merging", {}),
        ("routed/tall_masks", {"tall_mask_lambda": 0.2}),
    ):
        metrics = fusion_bench.evaluate(name, pool, taskpool, **options)
        assert set(metrics) >= {f"test/{t}/acc" for t in TASKS} | {"test/avg_acc"}
        assert all(0.0 <= metrics[f"test/{t}/acc"] <= 1.0 for t in TASKS)


def test_on_a_pool_of_one_repeated_expert_each_task_gets_that_expert(
    open_clip_pool_files, taskpool
):
    """EMR of N identical experts, and TALL of one expert: each task's model is the expert, so
    the accuracies are the individual expert's."""
    from fusion_bench.modelpool.open_clip import OpenCLIPModelPool

    f = open_clip_pool_files
    same = {t: f["experts"][TASKS[0]] for t in TASKS}
    pool = OpenCLIPModelPool(f["model_name"], f["pretrained"], same, model_config=f["config"])
    individual = fusion_bench.evaluate("individual", pool, taskpool)
    assert fusion_bench.evaluate("routed/emr_merging", pool, taskpool) == pytest.approx(
        individual, abs=1e-5
    )
    one = OpenCLIPModelPool(
        f["model_name"], f["pretrained"], {TASKS[0]: same[TASKS[0]]}, model_config=f["config"]
    )
    taskpool.tasks = [TASKS[0]]
    alone = fusion_bench.evaluate("individual", one, taskpool)
    assert fusion_bench.evaluate("routed/tall_masks", one, taskpool) == pytest.approx(
        alone, abs=1e-5
    )


def test_cli_reports_the_storage_cost(open_clip_cli_args, tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, err = run_cli(
        [
            *open_clip_cli_args,
            "method=routed/emr_merging",
            "fast_dev_run=true",
            "logger=none",
            f"hydra.run.dir={out_dir}",
            f"report_save_path={out_dir / 'report.json'}",
        ],
        capsys,
    )
    assert code == 0, err
    assert "oracle task id" in out
    report = json.loads((out_dir / "report.json").read_text())
    assert report["costs"]["storage_vs_pretrained"] == pytest.approx(2 + 2 / 32, rel=1e-3)
    assert report["costs"]["forward_passes_per_image"] == 1
