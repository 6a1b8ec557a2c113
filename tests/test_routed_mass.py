"""MASS (fusion_bench/method/routed/mass.py) against closed forms and a dense float64 re-statement
of the authors' rule, plus the routed-model round trip through the runner (save, reload)."""

from __future__ import annotations

import json

import pytest
import torch

import fusion_bench
from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import Context
from fusion_bench.method.routed.checkpoint import read_routed, write_routed
from fusion_bench.method.routed.mass import Mass, coefficients, select, tsvm
from fusion_bench.modelpool.open_clip import OpenCLIPModelPool
from fusion_bench.spectral import top_singular_triplets
from fusion_bench.taskpool.clip_classification import CLIPClassificationTaskPool
from tests.conftest import TASKS
from tests.test_cli import run_cli


def pool_of(files: dict, experts: dict) -> OpenCLIPModelPool:
    return OpenCLIPModelPool(
        files["model_name"], files["pretrained"], experts, model_config=files["config"]
    )


@pytest.fixture(scope="module")
def images():
    return torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def dense_tsvm(pre: dict, experts: list[dict], tasks: list[int], n: int, key: str) -> torch.Tensor:
    """θ0 + TSV-M of ``tasks`` for one matrix, with torch.linalg.svd in float64 (the paper's
    equations: per task the top ⌊r/n⌋ triplets; the stacks replaced by P Qᵀ of their SVDs)."""
    base = pre[key].double()
    k = min(base.shape) // n
    us, ss, vs = [], [], []
    for t in tasks:
        u, s, vh = torch.linalg.svd(experts[t][key].double() - base, full_matrices=False)
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(vh[:k])
    u_cat, s_cat, v_cat = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 0)

    def polar(a):
        p, _, qh = torch.linalg.svd(a, full_matrices=False)
        return p @ qh

    return base + (polar(u_cat) * s_cat) @ polar(v_cat)


def test_one_expert_is_reproduced_exactly(open_clip_pool_files, open_clip_pool, images):
    """T = 1: k = full rank, the router can only pick that task, θ_Ω = θ0 + τ = the expert."""
    name = TASKS[0]
    pool = pool_of(open_clip_pool_files, {name: open_clip_pool_files["experts"][name]})
    model = Mass().build(pool, None, Context())
    expert = pool.build_encoder(pool.expert(name))
    with torch.no_grad():
        reference = pool.classifier(expert).features(expert, images)
        agnostic, oracle = model(images), model(images, task=name)
    torch.testing.assert_close(agnostic, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(oracle, reference, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.last_routing, torch.ones(len(images), 1))


def test_second_pass_model_is_tsvm_of_the_selected_tasks(open_clip_pool, open_clip_pool_files):
    pool = open_clip_pool
    model = Mass().build(pool, None, Context())
    pre = {k: v.float() for k, v in pool.pretrained().items()}
    experts = [{k: v.float() for k, v in pool.expert(n).items()} for n in pool.expert_names]
    n = len(experts)
    for tasks in [(0,), (0, 1)]:
        merged = model.merged(tasks)
        for key in model.matrix_keys:
            expected = dense_tsvm(pre, experts, list(tasks), n, key)
            torch.testing.assert_close(merged[key].double(), expected, atol=1e-5, rtol=1e-5)
        for key in model.other_keys:  # mean of the selected tasks' full updates
            mean = sum(experts[t][key] - pre[key] for t in tasks) / len(tasks)
            torch.testing.assert_close(merged[key], pre[key] + mean, atol=1e-6, rtol=1e-6)


def test_realistic_matrix_tsvm_matches_float64_restatement():
    """A 768×768 ill-conditioned layer (σ from 1e-2 down to 1e-9) merged over 3 tasks from the
    stored float32 factors gives the dense float64 rule to float32 precision."""
    g = torch.Generator().manual_seed(0)
    d, n = 768, 3
    pre = {"w": torch.randn(d, d, generator=g) * 0.02}
    experts = []
    for _ in range(n):
        q1, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        q2, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        s = torch.logspace(0, -7, d, dtype=torch.float64) * 1e-2
        experts.append({"w": (pre["w"].double() + (q1 * s) @ q2.T).float()})
    k = d // n
    triplets = [top_singular_triplets(e["w"].double() - pre["w"].double(), k) for e in experts]
    u, s, v = (torch.stack([t[i] for t in triplets]).float() for i in range(3))
    got = pre["w"].double() + tsvm(u, s, v, [0, 1, 2])
    expected = dense_tsvm(pre, experts, [0, 1, 2], n, "w")
    assert (got - expected).abs().max() <= 1e-5 * (expected - pre["w"].double()).abs().max()


def test_router_picks_the_task_whose_subspace_holds_the_feature(open_clip_pool):
    model = Mass().build(open_clip_pool, None, Context())
    v = model.v.get(model.router_key)  # (T, k, D)
    for t in range(len(TASKS)):
        z = (torch.randn(4, v.shape[1], generator=torch.Generator().manual_seed(t)) @ v[t]) * 10
        coefficients = model.coefficients(z)
        assert coefficients.argmax(dim=1).tolist() == [t] * 4
        assert torch.allclose(coefficients.sum(dim=1), torch.ones(4))
        assert all(tasks[0] == t or t in tasks for tasks in model.select(coefficients))


def test_selection_rule():
    c = torch.tensor([[0.1, 0.15, 0.05, 0.7], [0.3, 0.25, 0.4, 0.05], [0.19, 0.19, 0.2, 0.42]])
    assert select(c, threshold=0.2, max_tasks=2) == [(3,), (0, 2), (3,)]
    assert select(c, threshold=0.5, max_tasks=3) == [(3,), (2,), (3,)]  # none above: the argmax


def test_coefficients_are_a_softmax_of_standardised_negative_residuals():
    g = torch.Generator().manual_seed(1)
    v = torch.stack([torch.linalg.qr(torch.randn(8, 3, generator=g))[0].T for _ in range(4)])
    z = torch.randn(5, 8, generator=g, dtype=torch.float64)
    r = torch.stack([(z - (z @ vt.double().T) @ vt.double()).norm(dim=1) for vt in v], dim=1)
    logits = -r
    logits = (logits - logits.mean(1, keepdim=True)) / (logits.std(1, keepdim=True) + 1e-6)
    expected = torch.softmax(logits / 0.5, dim=1)
    torch.testing.assert_close(coefficients(z, v, temperature=0.5), expected)


def test_redundancy_filter_leaves_parallel_updates_out_of_the_first_pass(
    open_clip_pool_files, open_clip_pool, tmp_path
):
    """Expert b = θ0 + 2τ_a: every rank-k update of b has cosine 1 with a's, so with ε = 0.3 the
    first-pass matrices are TSV-M(a) alone; with no threshold, TSV-M of both."""
    from safetensors.torch import save_file

    path = open_clip_pool_files["experts"][TASKS[0]]
    pre, a = open_clip_pool.pretrained(), open_clip_pool.expert(TASKS[0])
    doubled = {k: (pre[k] + 2 * (a[k] - pre[k])).contiguous() for k in a}
    save_file(doubled, tmp_path / "b.safetensors")
    pool = pool_of(open_clip_pool_files, {"a": path, "b": str(tmp_path / "b.safetensors")})
    model = Mass(redundancy_threshold=0.3).build(pool, None, Context())
    first, alone = model.first_pass_model(), model.merged((0,))
    for key in model.matrix_keys:
        torch.testing.assert_close(first[key], alone[key])
    plain = Mass(redundancy_threshold=None).build(pool, None, Context())
    both = plain.merged((0, 1))  # second-pass models never filter
    for key in model.matrix_keys:
        assert torch.equal(plain.first_pass_model()[key], both[key])
        assert not torch.allclose(both[key], alone[key])


def test_bad_options_and_task_ids(open_clip_pool):
    with pytest.raises(FusionBenchError, match="max_tasks=0"):
        Mass(max_tasks=0)
    with pytest.raises(FusionBenchError, match="router_layer=5: this image tower has 2"):
        Mass(router_layer=5, max_tasks=2).build(open_clip_pool, None, Context())
    with pytest.raises(FusionBenchError, match="threshold"):
        Mass(threshold=1.5)
    with pytest.raises(FusionBenchError, match="redundancy_threshold"):
        Mass(redundancy_threshold=2.0)
    model = Mass(max_tasks=2).build(open_clip_pool, None, Context())
    with pytest.raises(FusionBenchError, match="'cifar10' is not an expert"):
        model(torch.zeros(1, 3, 16, 16), task="cifar10")


def test_more_experts_than_a_matrix_has_ranks(open_clip_pool_files):
    path = open_clip_pool_files["experts"][TASKS[0]]
    pool = pool_of(open_clip_pool_files, {f"e{i}": path for i in range(40)})  # width 32
    with pytest.raises(FusionBenchError, match="= 0 singular vectors per task"):
        Mass(max_tasks=1).build(pool, None, Context())


def test_costs_and_both_modes_in_the_report(open_clip_cli_args, tmp_path, capsys):
    saved = tmp_path / "mass"
    code, out, err = run_cli(
        [
            *open_clip_cli_args,
            "method=routed/mass",
            "method.max_tasks=2",
            f"merged_model_save_path={saved}",
            "logger=none",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capsys,
    )
    assert code == 0, err[-3000:]
    assert "test routing" in out and "test oracle" in out and "task-agnostic" in out
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    costs = report["costs"]
    assert costs["forward_passes_per_image"] == 2
    assert (
        costs["storage_vs_pretrained"]
        == costs["stored_parameters"] / costs["pretrained_parameters"]
    )
    assert 1.5 < costs["storage_vs_pretrained"] < 4.0
    metrics = report["metrics"]
    assert {f"routing/test/{t}/acc" for t in TASKS} <= set(metrics)
    assert {f"oracle/test/{t}/acc" for t in TASKS} | {"oracle/test/avg_acc"} <= set(metrics)
    config = json.loads((saved / "config.json").read_text())
    assert config["format"] == "fusion_bench.routed" and config["experts"] == list(TASKS)
    assert config["method"]["_target_"] == "fusion_bench.method.routed.mass.Mass"
    # the user's next step, as the saved card says: evaluate the saved model again
    code, out, err = run_cli(
        [
            *open_clip_cli_args,
            "method=routed/checkpoint",
            f"method.path={saved}",
            "logger=none",
            f"hydra.run.dir={tmp_path / 'again'}",
        ],
        capsys,
    )
    assert code == 0, err[-3000:]
    again = json.loads((tmp_path / "again" / "report.json").read_text())["metrics"]
    assert again == pytest.approx(metrics, abs=1e-6)
    assert f"method=routed/checkpoint method.path={saved}" in (saved / "README.md").read_text()


def test_saved_model_reloads_to_the_same_outputs(open_clip_pool, tmp_path, images):
    method = Mass(max_tasks=2, threshold=0.1)
    model = method.build(open_clip_pool, None, Context())
    write_routed(model, method, open_clip_pool, tmp_path, "card")
    again = read_routed(tmp_path, open_clip_pool)
    with torch.no_grad():
        assert torch.equal(model(images), again(images))
        assert torch.equal(model.last_routing, again.last_routing)
        assert torch.equal(model(images, task=TASKS[1]), again(images, task=TASKS[1]))
    assert again.stored_parameters() == model.stored_parameters()


def test_reload_errors_are_clear(open_clip_pool, tmp_path):
    with pytest.raises(FusionBenchError, match="no config.json"):
        read_routed(tmp_path, open_clip_pool)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(FusionBenchError, match="not valid JSON"):
        read_routed(tmp_path, open_clip_pool)
    (tmp_path / "config.json").write_text(json.dumps({"format": "x", "version": 1}))
    with pytest.raises(FusionBenchError, match="not a fusion_bench routed model"):
        read_routed(tmp_path, open_clip_pool)


def test_python_api_reports_both_modes(open_clip_pool, tiny_datasets):
    taskpool = CLIPClassificationTaskPool(list(TASKS), datasets=tiny_datasets)
    metrics = fusion_bench.evaluate("routed/mass", open_clip_pool, taskpool, max_tasks=2)
    individual = fusion_bench.evaluate("individual", open_clip_pool, taskpool)
    assert "test/avg_acc" in metrics and "routing/test/avg_acc" in metrics
    assert 0.0 <= metrics["routing/test/avg_acc"] <= 1.0
    # the oracle model of a task is θ0 + its rank-⌊r/2⌋ update: not the expert itself
    assert set(individual) <= {k.removeprefix("oracle/") for k in metrics if "oracle/" in k}


def test_hugging_face_pool(hf_pool):
    model = Mass(max_tasks=2).build(hf_pool, None, Context())
    assert model.router_module.endswith("mlp.fc1")
    size = hf_pool.vision_config.image_size
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        out = model(x)
    assert out.shape[0] == 3 and torch.isfinite(out).all()
    assert model.last_routing.shape == (3, len(hf_pool.expert_names))
