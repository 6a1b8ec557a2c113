"""WEMoE oracles on the tiny pools: the mixing layer and a whole MoE block against a float64
re-statement of the paper's formulas; routers at their initialisation with zeroed weights =
task arithmetic (λ0); routers giving one-hot(t) = expert t's MLPs (one expert + λ0 = 1: that
expert); experts equal to θ0 = the pretrained model; test-time adaptation lowers the entropy;
save → reload gives identical outputs; both evaluation modes through the API; bad options."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fusion_bench
from fusion_bench.errors import FusionBenchError
from fusion_bench.method.adamerging import entropy
from fusion_bench.method.base import Context, pool_experts
from fusion_bench.method.routed import wemoe as wemoe_module
from fusion_bench.method.routed.checkpoint import read_routed, write_routed
from fusion_bench.method.routed.wemoe import WEMoE, WEMoEModel, mixed_linear
from fusion_bench.method.task_arithmetic import TaskArithmetic
from fusion_bench.taskpool.clip_classification import CLIPClassificationTaskPool
from fusion_bench.taskpool.data import TaskData
from tests.conftest import TASKS

IMAGES = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def features(pool, state) -> torch.Tensor:
    """The pool's joint-space features of IMAGES for a plain image-tower state dict."""
    encoder = pool.build_encoder(state)
    with torch.no_grad():
        return pool.classifier(encoder).features(encoder, IMAGES)


def set_routers(model: WEMoEModel, bias: list[float] | None = None, std: float = 0.0, seed=0):
    """Router weights ~ N(0, std²) (0: zeroed, so λ = the output bias) and output bias ``bias``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for moe in model.moes:
            for name, p in moe.router.named_parameters():
                if name.endswith("weight"):
                    p.copy_(std * torch.randn(p.shape, generator=g))
            if bias is not None:
                moe.router.out.bias.copy_(torch.tensor(bias))


@pytest.fixture(scope="module")
def taskpool(tiny_datasets):
    return CLIPClassificationTaskPool(list(TASKS), datasets=tiny_datasets, fast_dev_run=True)


def single_expert_pool(files, experts: dict[str, str]):
    from fusion_bench.modelpool.open_clip import OpenCLIPModelPool

    return OpenCLIPModelPool(
        files["model_name"], files["pretrained"], experts, model_config=files["config"]
    )


# -- the maths against a float64 re-statement ------------------------------------------------
def close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    """A float32 result against its float64 re-statement."""
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol, rtol=tol)


def dense_linear(x, lam, w0, b0, tw, tb):
    """Per sample b: W_b = W0 + Σ_t λ_bt τ_t, y_b = x_b W_bᵀ + b_b (float64)."""
    ws = w0 + torch.einsum("bt,toi->boi", lam, tw)
    bs = b0 + lam @ tb
    return torch.einsum("bsi,boi->bso", x, ws) + bs[:, None, :]


@pytest.mark.parametrize("chunked", [False, True])
def test_mixed_linear_equals_the_per_sample_merge(chunked, monkeypatch):
    n_in, n_out = 6, 10
    if chunked:  # one sample per merge chunk
        monkeypatch.setattr(wemoe_module, "MERGE_CHUNK", n_in * n_out)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, n_in, generator=g)
    lam = torch.randn(4, 3, generator=g)
    w0, b0 = torch.randn(n_out, n_in, generator=g), torch.randn(n_out, generator=g)
    tw, tb = torch.randn(3, n_out, n_in, generator=g), torch.randn(3, n_out, generator=g)
    args64 = [t.double() for t in (x, lam, w0, b0, tw, tb)]
    expected = dense_linear(*args64)
    with torch.no_grad():
        close(mixed_linear(x, lam, w0, b0, tw, tb), expected)
    # the custom backward: same values and the same gradients as the dense float64 formula
    lam_g, x_g = lam.clone().requires_grad_(), x.clone().requires_grad_()
    out = mixed_linear(x_g, lam_g, w0, b0, tw, tb)
    close(out, expected)
    lam64, x64 = args64[1].clone().requires_grad_(), args64[0].clone().requires_grad_()
    dense_linear(x64, lam64, *args64[2:]).square().sum().backward()
    out.square().sum().backward()
    close(lam_g.grad, lam64.grad, 1e-4)
    close(x_g.grad, x64.grad, 1e-4)
    x64, lam64 = x64.detach().requires_grad_(), lam64.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: mixed_linear(a, b, *args64[2:]), (x64, lam64))
    # one λ for the whole batch (oracle, batch_reduce): the same merged layer for every sample
    shared = dense_linear(*args64[:1], args64[1][:1].expand(4, -1), *args64[2:])
    close(mixed_linear(x, lam[0], w0, b0, tw, tb), shared)


@pytest.mark.parametrize("pool_name", ["open_clip_pool", "hf_pool"])
def test_a_block_equals_the_papers_formulas(pool_name, request):
    """One MoE block against: λ_b = mean_tokens(W2 ReLU(W1 h + b1) + b2);
    W(b) = W0 + Σ_t λ_bt τ_t for both linear layers; y = W_out(b) act(W_in(b) h + b_in(b)) + …"""
    pool = request.getfixturevalue(pool_name)
    model = WEMoE(max_steps=0).initial_model(pool)
    set_routers(model, std=0.3, seed=1)  # routes that differ from sample to sample
    pre, experts = pool.pretrained(), pool_experts(pool)
    path = model.paths[-1]
    moe = model.moes[-1]
    keys = wemoe_module._mlp_keys(pool.build_encoder().get_submodule(path), path)
    w0 = [pre[k].double() for k in keys]
    taus = [torch.stack([experts[n][k].double() - pre[k].double() for n in experts]) for k in keys]
    r = {k: v.double() for k, v in moe.router.state_dict().items()}
    h = torch.randn(3, 6, w0[0].shape[1], generator=torch.Generator().manual_seed(2)).double()
    per_token = F.relu(h @ r["hidden.weight"].T + r["hidden.bias"]) @ r["out.weight"].T
    lam = (per_token + r["out.bias"]).mean(dim=1)  # (B, T): per token, averaged over tokens
    merged = [w + torch.einsum("bt,t...->b...", lam, tau) for w, tau in zip(w0, taus, strict=True)]
    hidden = torch.einsum("bsi,boi->bso", h, merged[0]) + merged[1][:, None]
    hidden = moe.inner.double()(hidden)
    expected = torch.einsum("bsi,boi->bso", hidden, merged[2]) + merged[3][:, None]
    moe.float()
    with torch.no_grad():
        torch.testing.assert_close(moe(h.float()).double(), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(moe.last_lambda.double(), lam, atol=1e-6, rtol=1e-6)
    model.requires_grad_(True)  # with autograd recording (the adaptation): the same values
    torch.testing.assert_close(moe(h.float()).double(), expected, atol=1e-5, rtol=1e-5)
    # last_routing: the blocks' coefficients averaged over the blocks
    with torch.no_grad():
        model(IMAGES)
    mean = torch.stack([m.last_lambda for m in model.moes]).mean(dim=0)
    assert model.last_routing.shape == (len(IMAGES), len(TASKS))
    torch.testing.assert_close(model.last_routing, mean)


# -- closed-form oracles on whole models -------------------------------------------------------
@pytest.mark.parametrize("pool_name", ["open_clip_pool", "hf_pool"])
def test_initial_routers_give_task_arithmetic(pool_name, request):
    pool = request.getfixturevalue(pool_name)
    model = WEMoE(max_steps=0).initial_model(pool)
    for moe in model.moes:  # FusionBench's init: N(0, 0.01²) weights, b1 = 0, b2 = λ0
        router = moe.router
        assert torch.equal(router.out.bias, torch.full((len(TASKS),), 0.3))
        assert torch.equal(router.hidden.bias, torch.zeros_like(router.hidden.bias))
        for w in (router.hidden.weight, router.out.weight):
            assert 0.005 < w.std().item() < 0.015 and abs(w.mean().item()) < 0.005
    set_routers(model)  # the hidden layer contributes 0: λ = 0.3 for every task and input
    ta = TaskArithmetic(scaling_factor=0.3).merge(pool.pretrained(), pool_experts(pool))
    with torch.no_grad():
        out = model(IMAGES)
    torch.testing.assert_close(out, features(pool, ta), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.last_routing, torch.full((len(IMAGES), len(TASKS)), 0.3))


def test_one_hot_routers_give_that_experts_mlps(open_clip_pool):
    pool = open_clip_pool
    model = WEMoE(max_steps=0).initial_model(pool)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    for t, name in enumerate(pool.expert_names):
        set_routers(model, bias=[float(i == t) for i in range(len(TASKS))])
        expert = pool.build_encoder(pool.expert(name))
        with torch.no_grad():
            for path, moe in zip(model.paths, model.moes, strict=True):
                torch.testing.assert_close(moe(x), expert.get_submodule(path)(x))
            routed = model(IMAGES)
            oracle = model(IMAGES, task=name)  # the oracle mode: λ = one-hot(t) in every block
        torch.testing.assert_close(oracle, routed, atol=1e-6, rtol=1e-6)
        assert model.last_routing.argmax(dim=-1).eq(t).all()


def test_one_expert_with_lambda_one_is_that_expert(open_clip_pool_files):
    pool = single_expert_pool(
        open_clip_pool_files, {"mnist": open_clip_pool_files["experts"]["mnist"]}
    )
    model = WEMoE(init_lambda=1.0, max_steps=0).initial_model(pool)
    set_routers(model)  # λ = 1: W0 + τ in every MLP; TA with λ = 1 elsewhere
    expected = features(pool, pool.expert("mnist"))
    with torch.no_grad():
        torch.testing.assert_close(model(IMAGES), expected, atol=1e-5, rtol=1e-5)
        set_routers(model, bias=[-3.0], std=0.5)  # the oracle ignores the routers
        torch.testing.assert_close(model(IMAGES, task="mnist"), expected, atol=1e-5, rtol=1e-5)


def test_experts_equal_to_pretrained_give_the_pretrained_model(
    open_clip_pool, open_clip_pool_files, tmp_path
):
    from safetensors.torch import save_file

    pre = dict(open_clip_pool.pretrained())
    path = tmp_path / "same.safetensors"
    save_file({k: v.contiguous() for k, v in pre.items()}, path)
    pool = single_expert_pool(open_clip_pool_files, {t: str(path) for t in TASKS})
    model = WEMoE(max_steps=0).initial_model(pool)
    set_routers(model, std=0.5, seed=5)  # any routing: every τ is 0
    with torch.no_grad():
        torch.testing.assert_close(model(IMAGES), features(pool, pre), atol=1e-5, rtol=1e-5)
        out = model(IMAGES, task=TASKS[1])
    torch.testing.assert_close(out, features(pool, pre), atol=1e-5, rtol=1e-5)


# -- test-time adaptation ----------------------------------------------------------------------
def total_entropy(model: WEMoEModel, pool, data: TaskData) -> float:
    base = pool.classifier(model.encoder)
    total = 0.0
    with torch.no_grad():
        for task in model.expert_names:
            head = data.zero_shot_head(base, task, torch.device("cpu"))
            images = torch.cat(list(data.images(task, "test", base.preprocess, 24, 24)))
            feats = model(images)
            logits = base.logit_scale * F.normalize(feats, dim=-1) @ head
            total += entropy(logits).item()
    return total


def test_adaptation_lowers_the_entropy_of_every_tasks_test_images(open_clip_pool, tiny_datasets):
    data = TaskData(datasets=tiny_datasets)
    before = WEMoE(max_steps=0).build(open_clip_pool, data, Context())
    method = WEMoE(max_steps=6, lr=1e-2, batch_size=8)
    after = method.build(open_clip_pool, data, Context())
    assert len(after.tta_history) == 6 and "tta/mnist/entropy" in after.tta_history[0]
    assert (
        total_entropy(after, open_clip_pool, data)
        < total_entropy(before, open_clip_pool, data) - 1e-3
    )
    assert all(not p.requires_grad for p in after.parameters())  # frozen for evaluation
    # only the routers moved: the TA tower and the experts' MLPs are untouched
    routers = {n for n, _ in after.named_parameters() if ".router." in n}
    for key, value in after.state_dict().items():
        if key not in routers:
            assert torch.equal(value, before.state_dict()[key]), key
    assert any(not torch.equal(after.state_dict()[k], before.state_dict()[k]) for k in routers)
    # fast_dev_run: one step; batch_reduce (FusionBench's adaptation) runs too
    quick = WEMoE(batch_size=4, batch_reduce=True).build(
        open_clip_pool, data, Context(fast_dev_run=True)
    )
    assert len(quick.tta_history) == 1
    assert not any(m.batch_reduce for m in quick.moes)  # evaluation routes per sample


# -- save / reload, costs, evaluation ----------------------------------------------------------
def test_save_reload_round_trip_and_costs(open_clip_pool, tiny_datasets, tmp_path: Path):
    method = WEMoE(max_steps=2, batch_size=4, router_hidden_layers=2)
    model = method.build(open_clip_pool, TaskData(datasets=tiny_datasets), Context())
    write_routed(model, method, open_clip_pool, tmp_path, "card")
    again = read_routed(tmp_path, open_clip_pool)
    assert isinstance(again, WEMoEModel) and again.expert_names == model.expert_names
    with torch.no_grad():
        assert torch.equal(again(IMAGES), model(IMAGES))
        assert torch.equal(again.last_routing, model.last_routing)
        assert torch.equal(again(IMAGES, task=TASKS[0]), model(IMAGES, task=TASKS[0]))
    # stored: the TA tower (with W0 MLPs) + T MLP task vectors + the routers
    pre = open_clip_pool.pretrained()
    tower = sum(pre[k].numel() for k in pre)
    mlp = sum(pre[k].numel() for k in wemoe_module.mlp_keys(pre))
    routers = sum(p.numel() for p in model.routers())
    assert model.stored_parameters() == tower + len(TASKS) * mlp + routers
    d = 32  # the tiny tower's width; 2 blocks of d² + d + dT + T router numbers
    assert routers == 2 * (d * d + d + d * len(TASKS) + len(TASKS))
    # a saved model refused on a pool of another size, with a clear error
    with pytest.raises(FusionBenchError, match="does not fit"):
        method.load(open_clip_pool, ["mnist"], dict(model.state_dict()))


@pytest.mark.parametrize("pool_name", ["open_clip_pool", "hf_pool"])
def test_evaluated_in_both_modes(pool_name, request, taskpool):
    pool = request.getfixturevalue(pool_name)
    metrics = fusion_bench.evaluate(WEMoE(max_steps=1, batch_size=4), pool, taskpool)
    for task in TASKS:
        assert 0.0 <= metrics[f"routing/test/{task}/acc"] <= 1.0
        assert f"oracle/test/{task}/acc" in metrics and f"test/{task}/acc" in metrics
    assert "test/avg_acc" in metrics and "oracle/test/avg_acc" in metrics


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [
        {"max_steps": -1},
        {"lr": 0.0},
        {"lr": -1e-4},
        {"lr": float("inf")},
        {"batch_size": 0},
        {"router_hidden_layers": 3},
        {"init_lambda": float("inf")},
        {"log_every": 0},
    ],
)
def test_bad_options_name_the_option(options):
    ((name, value),) = options.items()
    with pytest.raises(FusionBenchError, match=rf"method\.{name}="):
        WEMoE(**options)


def test_unknown_task_id_and_missing_data(open_clip_pool):
    model = WEMoE(max_steps=0).initial_model(open_clip_pool)
    with pytest.raises(FusionBenchError, match="not an expert"):
        model(IMAGES, task="cifar10")
    with pytest.raises(FusionBenchError, match="unlabeled test images"):
        WEMoE(max_steps=3).build(open_clip_pool, None, Context())
