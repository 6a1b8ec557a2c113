"""Continual merging (fusion_bench/method/continual) and the sequential protocol
(fusion_bench/sequence.py): oracles, a literal re-statement of the reference's OPCM bookkeeping,
order (in)dependence, bad input, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

import fusion_bench
from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import merge_sequentially
from fusion_bench.method.continual.opcm import OPCM, split_rank
from fusion_bench.method.continual.task_arithmetic import ContinualTaskArithmetic
from fusion_bench.method.continual.ties_merging import ContinualTiesMerging
from fusion_bench.method.continual.weight_average import ContinualWeightAverage
from fusion_bench.method.simple_average import SimpleAverage
from fusion_bench.method.task_arithmetic import TaskArithmetic
from fusion_bench.method.ties_merging import TiesMerging
from fusion_bench.sequence import arrival_order, backward_transfer
from fusion_bench.testing import as_experts, assert_state_dict_close
from tests.test_cli import run_cli


def make_pool(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pre = {
        "w": torch.randn(12, 20, generator=g),  # a linear weight: projected
        "position_embedding.weight": torch.randn(5, 6, generator=g),  # 2-D, not linear
        "b": torch.randn(12, generator=g),
        "ids": torch.arange(3),
    }
    experts = []
    for _ in range(n):
        experts.append(
            {
                k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                for k, v in pre.items()
            }
        )
    return pre, as_experts(experts)


def run(method, pre, experts) -> list[dict]:
    return [m for _, m in merge_sequentially(method, pre, experts)]


# -- OPCM against a literal re-statement of the reference's λ bookkeeping -------------------------
def reference_opcm(pre, experts, alpha):
    """FusionBench's OPCMForCLIP, re-stated on state dicts: full-matrix SVD of the previous merged
    update, diagonal and top-left r×r block of Uᵀ τ V zeroed, λ_t = ‖·‖ / mean ‖τ‖."""
    names = list(experts)
    keys = [k for k in pre if pre[k].is_floating_point()]
    merged = {k: experts[names[0]][k].double() for k in keys}
    pre64 = {k: pre[k].double() for k in keys}

    def norm(state):
        return sum(float((state[k] - pre64[k]).square().sum()) for k in keys) ** 0.5

    norms = [norm(merged)]
    previous_lambda, outputs = 1.0, [dict(merged)]
    for name in names[1:]:
        task = {k: experts[name][k].double() for k in keys}
        norms.append(norm(task))
        average = sum(norms) / len(norms)
        new = {}
        for k in keys:
            delta, tau = merged[k] - pre64[k], task[k] - pre64[k]
            if k == "w":
                u, s, vh = torch.linalg.svd(delta, full_matrices=True)
                # the share in exact arithmetic (≤ 1): at α = 1 an ulp above 1 would decide r
                r = int(((s.cumsum(0) / s.sum()).clamp(max=1.0) > alpha).float().argmax())
                projected = u.T @ tau @ vh.T
                projected.diagonal().fill_(0)
                projected[:r, :r] = 0
                tau = u @ projected @ vh
            new[k] = pre64[k] + previous_lambda * delta + tau
        merged_norm = norm(new)
        previous_lambda = merged_norm / average
        merged = {k: pre64[k] + (new[k] - pre64[k]) * average / merged_norm for k in keys}
        outputs.append(dict(merged))
    return outputs


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.9, 1.0])
def test_opcm_equals_the_reference_bookkeeping_at_every_step(alpha):
    pre, experts = make_pool()
    ours = run(OPCM(alpha=alpha, average_keys=["*embedding*"]), pre, experts)
    for step, (mine, reference) in enumerate(
        zip(ours, reference_opcm(pre, experts, alpha), strict=True)
    ):
        for key, value in reference.items():
            torch.testing.assert_close(
                mine[key].double(), value, atol=2e-5, rtol=1e-5, msg=lambda m, s=step: f"{s}: {m}"
            )
        assert torch.equal(mine["ids"], pre["ids"])


def test_split_rank_is_the_first_index_past_alpha():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])  # cumulative shares 0.4, 0.7, 0.9, 1.0
    assert [split_rank(s, a) for a in (0.3, 0.4, 0.5, 0.95, 1.0)] == [0, 1, 1, 3, 0]
    assert split_rank(torch.zeros(3), 0.5) == 0
    # a spectrum whose last cumulative share rounds an ulp above 1 (cumsum and sum add in
    # different orders): α = 1 still protects no block, as in exact arithmetic
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        s = torch.rand(300, generator=gen, dtype=torch.float64).sort(descending=True).values
    assert bool((s.cumsum(0) / s.sum() > 1).any())
    assert split_rank(s, 1.0) == 0


def test_one_expert_gives_that_experts_rule():
    pre, experts = make_pool(1)
    (expert,) = experts.values()
    assert_state_dict_close(run(OPCM(), pre, experts)[-1], expert)
    assert_state_dict_close(run(ContinualWeightAverage(), pre, experts)[-1], expert)
    ta = TaskArithmetic(scaling_factor=0.3).merge(pre, experts)
    assert_state_dict_close(run(ContinualTaskArithmetic(scaling_factor=0.3), pre, experts)[-1], ta)
    ties = {
        k: pre[k] + 0.5 * (expert[k] - pre[k]) if pre[k].is_floating_point() else pre[k]
        for k in pre
    }
    assert_state_dict_close(run(ContinualTiesMerging(), pre, experts)[-1], ties)


def test_orthogonal_task_vectors_lose_nothing_to_the_projection():
    pre = {"w": torch.zeros(12, 20)}
    t1, t2 = torch.zeros(12, 20), torch.zeros(12, 20)
    g = torch.Generator().manual_seed(1)
    t1[:6, :10] = torch.randn(6, 10, generator=g)
    t2[6:, 10:] = torch.randn(6, 10, generator=g)  # rows and columns outside τ1's subspaces
    merged = run(OPCM(alpha=0.5), pre, {"a": {"w": t1}, "b": {"w": t2}})[-1]
    average = (t1.norm() + t2.norm()) / 2
    expected = (t1 + t2) * average / (t1 + t2).norm()
    torch.testing.assert_close(merged["w"], expected, atol=1e-6, rtol=1e-5)


def test_what_the_baselines_reduce_to_and_order_dependence():
    pre, experts = make_pool(4)
    reverse = dict(reversed(list(experts.items())))
    ta = ContinualTaskArithmetic(scaling_factor=0.3)
    assert_state_dict_close(
        run(ta, pre, experts)[-1], TaskArithmetic(scaling_factor=0.3).merge(pre, experts)
    )
    assert_state_dict_close(run(ta, pre, reverse)[-1], run(ta, pre, experts)[-1])
    wa = ContinualWeightAverage()
    assert_state_dict_close(run(wa, pre, experts)[-1], SimpleAverage().merge(pre, experts))
    assert_state_dict_close(run(wa, pre, reverse)[-1], run(wa, pre, experts)[-1])
    # OPCM and continual TIES depend on the order (measured here, not claimed otherwise)
    for method in (OPCM(), ContinualTiesMerging()):
        a, b = run(method, pre, experts)[-1]["w"], run(method, pre, reverse)[-1]["w"]
        assert (a - b).norm() / a.norm() > 1e-3


def test_continual_ties_adds_the_ties_merge_of_merged_update_and_new_vector():
    pre, experts = make_pool(2)
    first, second = experts.values()
    method = ContinualTiesMerging(scaling_factor=0.5, threshold=20, merge_func="sum")
    step1, step2 = run(method, pre, experts)
    ties = TiesMerging(scaling_factor=1.0, threshold=20, merge_func="sum").merge(
        pre, {"merged": step1, "new": second}
    )
    expected = {
        k: step1[k] + 0.5 * (ties[k] - pre[k]) if pre[k].is_floating_point() else pre[k]
        for k in pre
    }
    assert_state_dict_close(step2, expected, atol=1e-6)


def test_bad_values_fail_when_the_method_is_built():
    for alpha in (0.0, -0.5, 1.5):
        with pytest.raises(FusionBenchError, match="alpha"):
            OPCM(alpha=alpha)
    with pytest.raises(FusionBenchError, match="merge_func"):
        ContinualTiesMerging(merge_func="avg")


def test_arrival_order_checks_and_shuffles():
    names = ["a", "b", "c", "d"]
    assert arrival_order(names, None, None) == names
    assert arrival_order(names, ["c", "a"], None) == ["c", "a"]
    shuffled = arrival_order(names, None, 3)
    assert sorted(shuffled) == names and shuffled == arrival_order(names, None, 3)
    with pytest.raises(FusionBenchError, match=r"'x'.*does not have"):
        arrival_order(names, ["a", "x"], None)
    with pytest.raises(FusionBenchError, match="more than once"):
        arrival_order(names, ["a", "b", "a"], None)


def test_backward_transfer_is_the_papers_definition():
    accuracy = [{"a": 0.9}, {"a": 0.8, "b": 0.7}, {"a": 0.6, "b": 0.65, "c": 0.5}]
    # (0.6 − 0.9 + 0.65 − 0.7) / 2
    assert backward_transfer(accuracy, ["a", "b", "c"]) == pytest.approx(-0.175)


def test_python_api_gives_the_final_model(open_clip_pool):
    merged = fusion_bench.merge("continual/weight_average", open_clip_pool)
    assert_state_dict_close(merged, fusion_bench.merge("simple_average", open_clip_pool), atol=1e-6)


def test_cli_runs_the_sequential_protocol(open_clip_cli_args, tmp_path, capsys):
    code, out, err = run_cli(
        [
            *open_clip_cli_args,
            "method=continual/opcm",
            "sequence.order=[eurosat,mnist]",
            "sequence.save_every_step=true",
            "logger=csv",
            f"hydra.run.dir={tmp_path}",
        ],
        capsys,
    )
    assert code == 0, err
    assert "step 1: + eurosat" in out and "backward transfer" in out
    (logged,) = tmp_path.rglob("metrics.csv")  # per step and final, with BWT, to the logger
    header = logged.read_text().splitlines()[0]
    assert "continual/test/eurosat/acc" in header and "continual/test/bwt" in header
    report = json.loads((tmp_path / "report.json").read_text())
    continual = report["continual"]
    assert continual["order"] == ["eurosat", "mnist"]
    assert [s["expert"] for s in continual["steps"]] == ["eurosat", "mnist"]
    assert set(continual["steps"][0]["metrics"]) == {
        "test/eurosat/acc",
        "test/eurosat/loss",
        "test/avg_acc",
    }
    acc = [s["metrics"] for s in continual["steps"]]
    expected_bwt = acc[1]["test/eurosat/acc"] - acc[0]["test/eurosat/acc"]
    assert continual["bwt"]["test"] == pytest.approx(expected_bwt)
    assert continual["final_avg_acc"]["test"] == report["metrics"]["test/avg_acc"]
    assert (tmp_path / "continual.svg").read_text().startswith("<svg")
    assert sorted(p.name for p in (tmp_path / "steps").iterdir()) == ["1-eurosat", "2-mnist"]


def test_cli_refuses_a_bad_order_before_any_work(open_clip_cli_args, tmp_path, capsys):
    code, _, err = run_cli(
        [
            *open_clip_cli_args,
            "method=continual/opcm",
            "sequence.order=[eurosat,svhn]",
            "logger=none",
            f"hydra.run.dir={tmp_path}",
        ],
        capsys,
    )
    assert code == 2 and "sequence.order" in err and "svhn" in err


# -- DOP ---------------------------------------------------------------------------------------------
def test_dop_oracles():
    from fusion_bench.method.continual.dop import DOP

    pre, experts = make_pool(2)
    first = next(iter(experts.values()))
    assert_state_dict_close(run(DOP(), pre, {"a": first})[-1], first)  # one expert: itself
    # zero steps: every weight is the average of the merged model and the new expert
    assert_state_dict_close(
        run(DOP(num_steps=0), pre, experts)[-1], SimpleAverage().merge(pre, experts)
    )
    # identical experts: the start is already both objectives' minimum (zero gradients)
    same = {"a": first, "b": first, "c": first}
    assert_state_dict_close(run(DOP(num_steps=5), pre, same)[-1], first, atol=1e-6)


def test_dop_lowers_its_objective_and_min_norm_is_exact():
    from fusion_bench.method.continual.dop import DOP, min_norm_two

    pre, experts = make_pool(2)
    (a, b) = experts.values()
    dop = DOP(lr=1e-2, num_steps=50, ema=False)
    ta, tb = a["w"] - pre["w"], b["w"] - pre["w"]
    bases = [dop.subspace(t) for t in (ta, tb)]

    def total(w):
        return sum(
            float(dop.objective(w - t, basis)) for t, basis in zip((ta, tb), bases, strict=True)
        )

    result = dop.optimize(ta, tb, "cpu")
    assert total(result) < total((ta + tb) / 2)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        g1, g2 = torch.randn(7, generator=g), torch.randn(7, generator=g)
        grid = torch.linspace(0.001, 0.999, 9981)
        norms = torch.stack([(c * g1 + (1 - c) * g2).norm() for c in grid])
        assert abs(min_norm_two(g1, g2) - float(grid[norms.argmin()])) < 2e-4


def test_dop_bad_values():
    from fusion_bench.method.continual.dop import DOP

    for kwargs in (
        {"alpha": 1.5},
        {"svd_epsilon": 2.0},
        {"svd_proj_space": "w"},
        {"num_steps": -1},
    ):
        with pytest.raises(FusionBenchError, match="DOP"):
            DOP(**kwargs)


def test_cli_without_per_step_evaluation(open_clip_cli_args, tmp_path, capsys):
    code, out, err = run_cli(
        [
            *open_clip_cli_args,
            "method=continual/task_arithmetic",
            "sequence.evaluate_every_step=false",
            "sequence.shuffle_seed=1",
            "logger=none",
            f"hydra.run.dir={tmp_path}",
        ],
        capsys,
    )
    assert code == 0, err
    assert "step 1" not in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert sorted(report["continual"]["order"]) == ["eurosat", "mnist"]
    assert "steps" not in report["continual"] and not (tmp_path / "continual.svg").exists()
