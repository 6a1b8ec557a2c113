"""SMILE (fusion_bench.method.routed.smile) against a dense float64 re-statement of its rule, and
its closed-form special cases on the tiny open_clip and Hugging Face pools."""

from __future__ import annotations

import json

import pytest
import torch

import fusion_bench
from fusion_bench.api import build_method
from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import Context
from fusion_bench.method.routed import Tower, checkpoint, smile
from fusion_bench.method.routed.smile import (
    Smile,
    SmileAttention,
    SmileLinear,
    block_layers,
    plain_linear,
    smile_linear,
)
from tests.conftest import TASKS
from tests.test_cli import run_cli

F64 = torch.float64


# -- the rule, re-stated densely in float64 ------------------------------------------------------
def dense_smile(x, w0, b0, ws, bs, *, k, gate_k, top_k, use_diff=True, oracle=None):
    """y = W0 x + b0 + Σ_{i ∈ top-k} p̃_i (ΔW_i,k x + Δb_i), token by token, with full SVDs."""
    x, w0, b0 = x.to(F64), w0.to(F64), b0.to(F64)
    experts, gates = [], []
    for w, b in zip(ws, bs, strict=True):
        diff = w.to(F64) - w0
        u, s, vh = torch.linalg.svd(diff)
        low = diff if k == -1 else u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
        experts.append((low, b.to(F64) - b0))
        gate_vh = vh if use_diff else torch.linalg.svd(w.to(F64))[2]
        gates.append(gate_vh[:gate_k].T)  # n × gate_k
    out = []
    for token in x:
        y = w0 @ token + b0
        if oracle is not None:
            chosen = {oracle: 1.0}
        elif len(ws) == 1:
            chosen = {0: 1.0}
        else:
            r = torch.stack([torch.linalg.norm(g.T @ token) for g in gates])
            p = torch.softmax(r, dim=0)
            top = torch.argsort(p, descending=True)[:top_k].tolist()
            chosen = {i: float(p[i] / p[top].sum()) for i in top}
        for i, weight in chosen.items():
            y = y + weight * (experts[i][0] @ token + experts[i][1])
        out.append(y)
    return torch.stack(out)


def random_layer(m=12, n=10, experts=3, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    w0, b0 = torch.randn(m, n, generator=g, dtype=dtype), torch.randn(m, generator=g, dtype=dtype)
    ws = [w0 + 0.3 * torch.randn(m, n, generator=g, dtype=dtype) for _ in range(experts)]
    bs = [b0 + 0.3 * torch.randn(m, generator=g, dtype=dtype) for _ in range(experts)]
    return w0, b0, ws, bs


def layer_of(w0, b0, ws, bs, **options) -> SmileLinear:
    return smile_linear(w0, b0, lambda i: (ws[i], bs[i]), len(ws), **options)


@pytest.mark.parametrize(
    "options",
    [
        {"k": 4, "gate_k": 3, "top_k": 1},
        {"k": 4, "gate_k": 2, "top_k": 2},
        {"k": 10, "gate_k": 10, "top_k": 3},  # full rank, every expert mixed
        {"k": -1, "gate_k": 1, "top_k": 2},  # the dense ΔW
        {"k": 3, "gate_k": 2, "top_k": 2, "routing_use_diff": False},
    ],
)
def test_a_layer_matches_the_dense_float64_restatement(options):
    w0, b0, ws, bs = random_layer()
    layer = layer_of(w0, b0, ws, bs, **options)
    x = torch.randn(2, 7, 10, generator=torch.Generator().manual_seed(1), dtype=F64)
    dense_options = {"use_diff": options.get("routing_use_diff", True)}
    dense_options |= {key: options[key] for key in ("k", "gate_k", "top_k")}
    expected = dense_smile(x.reshape(-1, 10), w0, b0, ws, bs, **dense_options)
    torch.testing.assert_close(layer(x).reshape(-1, 12), expected, atol=1e-10, rtol=1e-10)
    for i in range(len(ws)):  # oracle: that expert's part only
        layer.routing.oracle = i
        oracle = dense_smile(x.reshape(-1, 10), w0, b0, ws, bs, **dense_options, oracle=i)
        torch.testing.assert_close(layer(x).reshape(-1, 12), oracle, atol=1e-10, rtol=1e-10)
    layer.routing.oracle = None


def test_the_layer_stores_what_the_rule_needs():
    w0, b0, ws, bs = random_layer(m=12, n=10, experts=3)
    layer = layer_of(w0.float(), b0.float(), [w.float() for w in ws], [b.float() for b in bs],
                     k=4, gate_k=2, top_k=1)  # fmt: skip
    shapes = {name: tuple(b.shape) for name, b in layer.named_buffers()}
    assert shapes == {
        "weight": (12, 10),
        "bias": (12,),
        "gate": (3, 2, 10),
        "u": (3, 12, 4),
        "svh": (3, 4, 10),
        "delta_bias": (3, 12),
    }
    assert all(b.dtype == torch.float32 for b in layer.buffers())
    assert sum(b.numel() for b in layer.buffers()) == 12 * 10 + 12 + 3 * (
        4 * (12 + 10) + 12 + 2 * 10
    )


def test_one_expert_at_full_rank_is_that_expert_and_untrained_layers_stay_pretrained():
    w0, b0, ws, bs = random_layer(m=8, n=6, experts=1)
    layer = layer_of(w0, b0, ws, bs, k=6, gate_k=6, top_k=1)
    x = torch.randn(5, 6, dtype=F64)
    torch.testing.assert_close(layer(x), x @ ws[0].T + bs[0], atol=1e-12, rtol=1e-12)
    assert torch.equal(layer.routing.total, torch.ones(5, 1, dtype=F64))  # 2-D: 5 one-token inputs
    same = [w0.clone(), w0 + 1e-9]  # |ΔW| ≤ 1e-8 for all: FusionBench's "not trained" → no layer
    assert layer_of(w0, b0, same, [b0, b0 + 1.0], k=2, gate_k=1, top_k=1) is None


def test_an_input_in_an_experts_gate_subspace_is_routed_to_it():
    """ΔW_i = U_i S_i V_iᵀ with the V_i in mutually orthogonal subspaces: a token x = V_i c has
    r_i = ‖c‖ and r_j = 0, so every token goes to its own expert (top-1) and the layer adds
    exactly ΔW_i x + Δb_i."""
    m, n, t, rank = 16, 12, 3, 4
    g = torch.Generator().manual_seed(3)
    q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0]
    w0, b0 = torch.randn(m, n, generator=g, dtype=F64), torch.zeros(m, dtype=F64)
    ws, bs, vs = [], [], []
    for i in range(t):
        v = q[:, i * rank : (i + 1) * rank]
        u = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=F64))[0]
        ws.append(w0 + u @ torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=F64)) @ v.T)
        bs.append(torch.full((m,), float(i + 1), dtype=F64))
        vs.append(v)
    layer = layer_of(w0, b0, ws, bs, k=rank, gate_k=2, top_k=1)
    for i in range(t):
        x = 3.0 * (torch.randn(6, 2, generator=g, dtype=F64) @ vs[i][:, :2].T)  # gate subspace
        weights, selected = layer.route(x)
        assert selected.squeeze(1).tolist() == [i] * 6
        assert torch.equal(weights.argmax(1), torch.full((6,), i))
        torch.testing.assert_close(layer(x), x @ ws[i].T + bs[i], atol=1e-10, rtol=1e-10)


# -- the attention of open_clip towers ------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_the_attention_wrapper_is_multihead_attention(batch_first, mask):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    d = 16
    parts = {
        part: plain_linear(mha.in_proj_weight[i * d : (i + 1) * d], mha.in_proj_bias[i * d : (i + 1) * d])
        for i, part in enumerate("qkv")
    }  # fmt: skip
    parts["out_proj"] = plain_linear(mha.out_proj.weight, mha.out_proj.bias)
    wrapped = SmileAttention(mha, parts).eval()
    x = torch.randn(3, 5, d) if batch_first else torch.randn(5, 3, d)
    attn_mask = None
    if mask == "bool":
        attn_mask = torch.rand(5, 5) > 0.7
        attn_mask.fill_diagonal_(False)
    elif mask == "float":
        attn_mask = torch.randn(5, 5)
    with torch.no_grad():
        expected = mha(x, x, x, need_weights=False, attn_mask=attn_mask)[0]
        actual = wrapped(x, x, x, need_weights=False, attn_mask=attn_mask)[0]
    torch.testing.assert_close(actual, expected, atol=2e-6, rtol=1e-5)


# -- on the tiny pools ----------------------------------------------------------------------------
class SwappedExperts:
    """A model pool with other experts (in-memory state dicts) and everything else the pool's."""

    def __init__(self, pool, experts: dict):
        self._pool, self._experts, self.expert_names = pool, experts, list(experts)

    def expert(self, name):
        return self._experts[name]

    def __getattr__(self, attr):
        return getattr(self._pool, attr)


def linear_keys(pool) -> set[str]:
    """The canonical keys of the block linear layers (what SMILE upscales)."""
    encoder = pool.build_encoder()
    keys = set()
    for name, module in block_layers(encoder):
        for sub, _ in module.named_parameters():
            keys.add(f"{name}.{sub}")
    return keys


def perturbed_linears(pool, seed: int, skip: tuple[str, ...] = (), scale: float = 0.05) -> dict:
    """θ0 with every block linear weight and bias perturbed (keys containing a ``skip`` string
    left at θ0), everything else θ0's."""
    pre = pool.pretrained()
    g = torch.Generator().manual_seed(seed)
    chosen = {k for k in linear_keys(pool) if not any(s in k for s in skip)}
    return {
        key: pre[key] + scale * torch.randn(pre[key].shape, generator=g) if key in chosen
        else pre[key].clone()
        for key in pre
    }  # fmt: skip


@pytest.fixture(params=["open_clip_pool", "hf_pool"])
def pool(request):
    return request.getfixturevalue(request.param)


def images(seed: int = 0, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def build(method: Smile, pool):
    return method.build(pool, None, Context())


def features(pool, state) -> torch.Tensor:
    encoder = pool.build_encoder(state)
    with torch.no_grad():
        return pool.classifier(encoder).features(encoder, images())


def test_one_expert_at_full_rank_is_that_expert(pool):
    """k = 32 is every layer's full rank on the tiny towers: SMILE of one expert that differs
    from θ0 in its block linear layers only is that expert (routing is trivial: p = 1)."""
    expert = perturbed_linears(pool, seed=1)
    one = SwappedExperts(pool, {"mnist": expert})
    model = build(Smile(k=32, gate_k=3), one)
    with torch.no_grad():
        agnostic, oracle = model(images()), model(images(), task="mnist")
    reference = features(pool, expert)
    torch.testing.assert_close(agnostic, reference, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(oracle, reference, atol=2e-5, rtol=1e-4)
    assert torch.equal(model.last_routing, torch.ones(3, 1))
    n_attention = sum(isinstance(m, SmileAttention) for m in model.modules())
    assert n_attention == (2 if pool.family == "open_clip" else 0)
    assert len(model.smile_layers) == 12  # 2 blocks × (q, k, v, out, fc1, fc2)


def test_average_experts_averages_all_but_the_class_token_and_projection(open_clip_pool):
    """One expert perturbed everywhere, k = full rank, ``average_experts``: the expert, with the
    class token and the output projection at θ0 (FusionBench's leaf-module rule)."""
    pool = open_clip_pool
    expert = dict(pool.expert(TASKS[0]))
    one = SwappedExperts(pool, {"mnist": expert})
    model = build(Smile(k=32, average_experts=True), one)
    pre = pool.pretrained()
    kept = {**expert, "class_embedding": pre["class_embedding"], "proj": pre["proj"]}
    with torch.no_grad():
        torch.testing.assert_close(model(images()), features(pool, kept), atol=2e-5, rtol=1e-4)
    assert not torch.allclose(features(pool, kept), features(pool, expert), atol=1e-3)
    plain = build(Smile(k=32), one)  # without: every non-linear tensor is θ0's
    non_linear = {k: pre[k] for k in pre if k not in linear_keys(pool)}
    with torch.no_grad():
        torch.testing.assert_close(
            plain(images()), features(pool, {**expert, **non_linear}), atol=2e-5, rtol=1e-4
        )


def test_experts_equal_to_the_pretrained_model_give_the_pretrained_tower(pool, monkeypatch):
    same = SwappedExperts(pool, {t: dict(pool.pretrained()) for t in TASKS})
    pretrained = features(pool, pool.pretrained())
    model = build(Smile(k=8, gate_k=2), same)  # every layer untrained: nothing replaced
    assert model.smile_layers == []
    with torch.no_grad():
        assert torch.equal(model(images()), pretrained)
    assert torch.equal(model.last_routing, torch.full((3, 2), 0.5))
    # every layer replaced anyway (ΔW = 0): the SMILE layers and the attention wrapper add 0
    monkeypatch.setattr(smile, "UNTRAINED_ATOL", -1.0)
    model = build(Smile(k=8, gate_k=2, top_k=2), same)
    assert len(model.smile_layers) == 12
    with torch.no_grad():
        torch.testing.assert_close(model(images()), pretrained, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(model(images(), task=TASKS[1]), pretrained, atol=2e-6, rtol=1e-5)


def test_oracle_mode_is_each_experts_low_rank_part(pool):
    """Two experts differing from θ0 in the block linears only, k full: the oracle of task t is
    expert t exactly; the task-agnostic routing weights are the per-token p̃ averaged over tokens
    and layers (recomputed here from each layer's input)."""
    experts = {t: perturbed_linears(pool, seed=i + 1) for i, t in enumerate(TASKS)}
    two = SwappedExperts(pool, experts)
    model = build(Smile(k=32, gate_k=4, top_k=2), two)
    for task in TASKS:
        with torch.no_grad():
            oracle = model(images(), task=task)
        torch.testing.assert_close(oracle, features(pool, experts[task]), atol=2e-5, rtol=1e-4)
    seen = []
    hooks = [
        layer.register_forward_hook(lambda mod, args, out: seen.append(mod.route(args[0].reshape(
            -1, mod.in_features))[0].view(*args[0].shape[:-1], -1).mean(1)))
        for layer in model.smile_layers
    ]  # fmt: skip
    with torch.no_grad():
        model(images())
    for hook in hooks:
        hook.remove()
    assert len(seen) == 12
    torch.testing.assert_close(model.last_routing, torch.stack(seen).mean(0))
    torch.testing.assert_close(model.last_routing.sum(1), torch.ones(3))
    with pytest.raises(FusionBenchError, match="not an expert"):
        model(images(), task="cifar10")


def stored_numbers(pool, n_experts: int, k: int, gate_k: int) -> int:
    """θ0 + per upscaled layer T·(k(m+n) + m + gate_k·n): FusionBench's parameter count."""
    total = sum(t.numel() for t in pool.pretrained().values())
    encoder = pool.build_encoder()
    for _, module in block_layers(encoder):
        shapes = (
            [module.weight.shape]
            if isinstance(module, torch.nn.Linear)
            else [(module.embed_dim, module.embed_dim)] * 3 + [module.out_proj.weight.shape]
        )
        for m, n in shapes:
            total += n_experts * (k * (m + n) + m + gate_k * n)
    return total


def test_save_and_reload_give_identical_outputs(open_clip_pool, tmp_path):
    """A pool where some layers are untrained (the q rows of block 0's in_proj, block 1's c_fc):
    the reloaded model has the same layers and the same outputs, bit for bit."""
    pool = open_clip_pool
    skip = ("resblocks.1.mlp.c_fc",)
    experts = {t: perturbed_linears(pool, seed=i + 1, skip=skip) for i, t in enumerate(TASKS)}
    pre = pool.pretrained()
    for state in experts.values():  # block 0's q rows back to θ0: a plain q beside SMILE k, v
        state["transformer.resblocks.0.attn.in_proj_weight"][:32] = pre[
            "transformer.resblocks.0.attn.in_proj_weight"
        ][:32]
    two = SwappedExperts(pool, experts)
    method = Smile(k=6, gate_k=2, top_k=2)
    model = build(method, two)
    assert len(model.smile_layers) == 10
    block0 = model.tower.encoder.transformer.resblocks[0].attn
    assert isinstance(block0.q, torch.nn.Linear) and isinstance(block0.k, SmileLinear)
    checkpoint.write_routed(model, method, pool, tmp_path, "card")
    assert json.loads((tmp_path / "config.json").read_text())["method"]["k"] == 6
    loaded = checkpoint.read_routed(tmp_path, pool)
    assert type(loaded) is type(model) and len(loaded.smile_layers) == 10
    with torch.no_grad():
        assert torch.equal(loaded(images()), model(images()))
        assert torch.equal(loaded.last_routing, model.last_routing)
        for task in TASKS:
            assert torch.equal(loaded(images(), task=task), model(images(), task=task))
    assert loaded.stored_parameters() == model.stored_parameters()


def test_dense_experts_reload(open_clip_pool, tmp_path):
    method = Smile(k=-1, gate_k=2)
    model = build(method, open_clip_pool)
    assert model.smile_layers[0].delta is not None and model.smile_layers[0].u is None
    checkpoint.write_routed(model, method, open_clip_pool, tmp_path, "card")
    loaded = checkpoint.read_routed(tmp_path, open_clip_pool)
    with torch.no_grad():
        assert torch.equal(loaded(images()), model(images()))


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"k": 0}, r"method\.k=0.*≥ 1"),
        ({"k": -2}, r"method\.k=-2"),
        ({"gate_k": 0}, r"method\.gate_k=0"),
        ({"top_k": 0}, r"method\.top_k=0"),
    ],
)
def test_bad_options_are_refused_when_given(options, message):
    with pytest.raises(FusionBenchError, match=message):
        build_method("routed/smile", options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"k": 33}, r"method\.k=33: the layer '.*' is 32×32, of rank at most 32"),
        ({"k": 8, "gate_k": 40}, r"method\.gate_k=40: .* rank at most 32"),
        ({"k": 8, "top_k": 3}, r"method\.top_k=3: the pool has 2 experts"),
    ],
)
def test_options_larger_than_the_pool_allows_are_refused(open_clip_pool, options, message):
    with pytest.raises(FusionBenchError, match=message):
        build(Smile(**options), open_clip_pool)


# -- the runner and the Python API ----------------------------------------------------------------
def test_cli_reports_routing_oracle_and_costs_and_reloads(
    open_clip_cli_args, open_clip_pool, tmp_path, capsys
):
    out_dir, saved = tmp_path / "run", tmp_path / "smile"
    options = ["method.k=8", "method.gate_k=2"]
    code, out, err = run_cli(
        [
            *open_clip_cli_args,
            "method=routed/smile",
            *options,
            "fast_dev_run=true",
            "logger=none",
            f"merged_model_save_path={saved}",
            f"hydra.run.dir={out_dir}",
            f"report_save_path={out_dir / 'report.json'}",
        ],
        capsys,
    )
    assert code == 0, err[-3000:]
    report = json.loads((out_dir / "report.json").read_text())
    metrics = report["metrics"]
    assert {f"routing/test/{t}/acc" for t in TASKS} <= set(metrics)
    assert {f"oracle/test/{t}/acc" for t in TASKS} <= set(metrics)
    costs = report["costs"]
    assert costs["forward_passes_per_image"] == 1
    assert costs["stored_parameters"] == stored_numbers(open_clip_pool, 2, k=8, gate_k=2)
    code, out, err = run_cli(
        [
            *open_clip_cli_args,
            "method=routed/checkpoint",
            f"method.path={saved}",
            "fast_dev_run=true",
            "logger=none",
            f"hydra.run.dir={tmp_path / 'again'}",
            f"report_save_path={tmp_path / 'again' / 'report.json'}",
        ],
        capsys,
    )
    assert code == 0, err[-3000:]
    again = json.loads((tmp_path / "again" / "report.json").read_text())["metrics"]
    assert {k: again[k] for k in metrics if "/acc" in k} == pytest.approx(
        {k: metrics[k] for k in metrics if "/acc" in k}, abs=1e-6
    )


def test_python_api_on_the_hf_pool(hf_pool, tiny_datasets):
    from fusion_bench.taskpool.clip_classification import CLIPClassificationTaskPool

    taskpool = CLIPClassificationTaskPool(list(TASKS), datasets=tiny_datasets, fast_dev_run=True)
    metrics = fusion_bench.evaluate("routed/smile", hf_pool, taskpool, k=8, gate_k=2, top_k=2)
    assert {"test/avg_acc", "routing/test/avg_acc", "oracle/test/avg_acc"} <= set(metrics)
    assert Smile().models_held(8) == 0.0
    model = build(Smile(k=8, gate_k=2), hf_pool)
    assert model.stored_parameters() == stored_numbers(hf_pool, 2, k=8, gate_k=2)
    assert isinstance(model.tower, Tower)
