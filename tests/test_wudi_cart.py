"""WUDI-Merging and CART against dense float64 re-statements of the papers' equations (the
oracles: torch autograd + torch.optim.Adam on the loss as written; ``torch.linalg.svd`` of every
centred task matrix), and their closed-form special cases."""

from __future__ import annotations

import logging

import pytest
import torch

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.cart import Cart, kept_rank
from fusion_bench.method.simple_average import SimpleAverage
from fusion_bench.method.task_arithmetic import TaskArithmetic
from fusion_bench.method.wudi import Wudi, interference_terms, optimise_layer
from fusion_bench.testing import as_experts, assert_state_dict_close, experts_around

QKV = [f"layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
OUT = "layers.0.self_attn.out_proj.weight"
FC1, FC2 = "layers.0.mlp.fc1.weight", "layers.0.mlp.fc2.weight"
LINEAR = [*QKV, OUT, FC1, FC2]


def make_state(seed: int, scale: float = 1.0) -> dict:
    """A Hugging Face-like block: separate q/k/v, a wide and a tall MLP weight, 1-D and 2-D
    tensors outside the blocks, an integer buffer."""
    g = torch.Generator().manual_seed(seed)
    state = {k: scale * torch.randn(10, 10, generator=g) for k in (*QKV, OUT)}
    state[FC1] = scale * torch.randn(16, 10, generator=g)  # tall
    state[FC2] = scale * torch.randn(10, 16, generator=g)  # wide
    state["layers.0.mlp.fc1.bias"] = scale * torch.randn(16, generator=g)
    state["layers.0.layer_norm1.weight"] = scale * torch.randn(10, generator=g)
    state["embeddings.position_embedding.weight"] = scale * torch.randn(5, 10, generator=g)
    state["position_ids"] = torch.arange(5)
    return state


@pytest.fixture
def pool():
    return experts_around(make_state, 0.05)


def fused(state: dict) -> dict:
    """The same tensors in open_clip's layout: q, k, v row-stacked into one in_proj_weight."""
    out = {k: v for k, v in state.items() if k not in QKV}
    out["layers.0.attn.in_proj_weight"] = torch.cat([state[k] for k in QKV])
    return out


def mean_tau(pre, fts, key):
    return sum(f[key].double() - pre[key].double() for f in fts) / len(fts)


# --- WUDI: the oracle is autograd + Adam on Σ_t ‖(M − τ_t) τ_tᵀ‖² / ‖τ_t‖², float64 -------------
def wudi_loss(m, taus):
    return sum(((m - t) @ t.T).square().sum() / t.square().sum() for t in taus)


def dense_wudi_layer(taus, steps, lr):
    taus = [t.double() for t in taus]
    m = torch.nn.Parameter(sum(taus))
    opt = torch.optim.Adam([m], lr=lr)
    losses = []
    for _ in range(steps):
        loss = wudi_loss(m, taus)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return m.detach(), losses


def dense_wudi(pre, fts, steps, lr, fuse_qkv=True, others="pretrained"):
    out = {}
    groups = [QKV] if fuse_qkv else [[k] for k in QKV]
    groups += [[OUT], [FC1], [FC2]]
    for keys in groups:
        taus = [torch.cat([f[k].double() - pre[k].double() for k in keys]) for f in fts]
        m, _ = dense_wudi_layer(taus, steps, lr)
        base = torch.cat([pre[k].double() for k in keys])
        for k, part in zip(keys, (base + m).split([pre[k].shape[0] for k in keys]), strict=True):
            out[k] = part.float()
    for k in pre:
        if k not in out:
            average = others == "average" and pre[k].is_floating_point()
            out[k] = (pre[k].double() + mean_tau(pre, fts, k)).float() if average else pre[k]
    return out


def test_wudi_loss_and_gradient_equal_autograd_on_the_loss_as_written():
    g = torch.Generator().manual_seed(0)
    for shape in [(12, 7), (7, 12)]:
        taus = [0.01 * torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(4)]
        a, b, c, total = interference_terms(iter(taus))
        torch.testing.assert_close(total, sum(taus))
        m = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True) * 0.01
        m.retain_grad()
        loss = wudi_loss(m, taus)
        loss.backward()
        ours = float((m.detach() @ a * m.detach()).sum() - 2 * (m.detach() * b).sum()) + c
        assert ours == pytest.approx(loss.item(), rel=1e-12)
        torch.testing.assert_close(2 * (m.detach() @ a - b), m.grad, rtol=1e-10, atol=1e-16)


def test_wudi_optimisation_equals_dense_adam_and_the_loss_decreases():
    g = torch.Generator().manual_seed(1)
    # realistic scale: rank-4 updates + noise, entries ~1e-3 like fine-tuned CLIP task vectors
    taus = [
        (1e-3 * torch.randn(96, 4, generator=g) @ torch.randn(4, 64, generator=g))
        + 1e-4 * torch.randn(96, 64, generator=g)
        for _ in range(5)
    ]
    merged, losses = optimise_layer(iter(taus), steps=120, lr=1e-5)
    reference, reference_losses = dense_wudi_layer(taus, steps=120, lr=1e-5)
    assert len(losses) == 121
    assert losses[:-1] == pytest.approx(reference_losses, rel=1e-9)
    assert float((merged - reference).norm() / reference.norm()) < 1e-10
    assert losses[-1] < 0.5 * losses[0]


def test_wudi_merge_equals_the_dense_oracle(pool):
    pre, fts = pool
    for fuse, others in [(True, "pretrained"), (False, "average")]:
        method = Wudi(steps=40, lr=1e-3, group_qkv=fuse, other_keys=others)
        out = method.merge(pre, as_experts(fts))
        assert_state_dict_close(out, dense_wudi(pre, fts, 40, 1e-3, fuse, others))


def test_wudi_fused_qkv_is_the_authors_in_proj(pool):
    """group_qkv on separate q/k/v = WUDI on open_clip's fused in_proj_weight (what the authors
    merged); without it the three are separate problems, a different result."""
    pre, fts = pool
    grouped = Wudi(steps=30, lr=1e-3).merge(pre, as_experts(fts))
    on_fused = Wudi(steps=30, lr=1e-3).merge(fused(pre), as_experts([fused(f) for f in fts]))
    assert_state_dict_close(fused(grouped), on_fused)
    separate = Wudi(steps=30, lr=1e-3, group_qkv=False).merge(pre, as_experts(fts))
    assert not torch.allclose(separate[QKV[0]], grouped[QKV[0]])


def test_wudi_single_expert_is_that_expert(pool):
    pre, fts = pool
    # Σ τ = τ_1 is the optimum (loss 0, gradient 0): Adam does not move
    alone = Wudi().merge(pre, as_experts(fts[:1]))
    assert_state_dict_close(alone, {k: fts[0][k] if k in LINEAR else pre[k] for k in pre})
    everything = Wudi(other_keys="average").merge(pre, as_experts(fts[:1]))
    assert_state_dict_close(everything, fts[0])


def test_wudi_converges_to_the_task_vector_of_identical_experts():
    """N identical experts: L = N ‖(M − τ) τᵀ‖² / ‖τ‖², zero exactly when the rows of M − τ are
    orthogonal to τ's row space; for a τ of full column rank (tall) the optimum is M = τ, and Adam
    (started at Nτ) reaches it. For a wide τ the optimum is τ plus anything in its null space."""
    g = torch.Generator().manual_seed(2)
    tau = 0.01 * torch.randn(9, 6, generator=g, dtype=torch.float64)
    merged, losses = optimise_layer(iter([tau] * 3), steps=4000, lr=1e-3)
    assert losses[-1] < 1e-12 * losses[0]
    torch.testing.assert_close(merged, tau, rtol=0, atol=1e-6)
    wide = tau.T.contiguous()  # 6×9: rank 6 < 9 columns
    a, b, c, _ = interference_terms(iter([wide] * 3))
    null = torch.randn(6, 9, generator=g, dtype=torch.float64)
    null -= null @ torch.linalg.pinv(wide) @ wide  # rows orthogonal to τ's row space

    def loss(m):
        return float((m @ a * m).sum() - 2 * (m * b).sum()) + c

    assert abs(loss(wide + 0.01 * null)) < 1e-12 * loss(3 * wide)


def test_wudi_special_cases_and_key_selection(pool):
    pre, fts = pool
    experts = as_experts(fts)
    # no steps: the starting point, Σ τ on the linear keys (task arithmetic at λ = 1)
    summed = TaskArithmetic(scaling_factor=1.0).merge(pre, experts)
    out = Wudi(steps=0).merge(pre, experts)
    assert_state_dict_close(out, {k: summed[k] if k in LINEAR else pre[k] for k in pre})
    # FusionBench's variant: every 2-D tensor optimised (position embedding too), the rest averaged
    out = Wudi(steps=5, linear_keys=["*"], other_keys="average", group_qkv=False).merge(
        pre, experts
    )
    average = SimpleAverage().merge(pre, experts)
    pos = "embeddings.position_embedding.weight"
    assert not torch.allclose(out[pos], average[pos]) and not torch.allclose(out[pos], pre[pos])
    for key in ("layers.0.mlp.fc1.bias", "layers.0.layer_norm1.weight", "position_ids"):
        torch.testing.assert_close(out[key], average[key])
    # excluded keys stay at θ0, even when they are linear weights
    out = Wudi(steps=5, exclude_keys=[FC1]).merge(pre, experts)
    assert torch.equal(out[FC1], pre[FC1])


def test_wudi_zero_task_vector_adds_no_term(pool):
    pre, fts = pool
    still = {k: v.clone() for k, v in pre.items()}  # an expert that did not move
    out = Wudi(steps=20, lr=1e-3).merge(pre, as_experts([*fts, still]))
    assert all(v.isfinite().all() for v in out.values() if v.is_floating_point())
    assert_state_dict_close(out, Wudi(steps=20, lr=1e-3).merge(pre, as_experts(fts)))


def test_wudi_logs_the_loss_and_shows_it_on_the_progress_bar(pool, caplog):
    pre, fts = pool

    class Bar(list):
        def __init__(self, keys):
            super().__init__(keys)
            self.postfix = []

        def set_postfix_str(self, text, refresh=True):
            self.postfix.append(text)

    bars = []
    with caplog.at_level(logging.INFO, logger="fusion_bench.method.wudi"):
        Wudi(steps=10, lr=1e-3).merge(
            pre, as_experts(fts), lambda keys: bars.append(Bar(keys)) or bars[-1]
        )
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("WUDI")]
    assert len(lines) == 4  # the fused q/k/v, out_proj, fc1, fc2
    assert "+".join(QKV) in lines[0]
    for line in lines:
        first, last = (float(x) for x in line.split("loss ")[1].split(" (")[0].split(" -> "))
        assert last < first
    assert len(bars[0].postfix) == 4 and "→" in bars[0].postfix[0]


def test_wudi_layers_optimised_in_parallel_equal_sequential(pool):
    # the test suite runs torch on one thread (conftest), where parallel_map is a plain loop
    pre, fts = pool
    method = Wudi(steps=30, lr=1e-3, linear_keys=["*"])
    sequential = method.merge(pre, as_experts(fts))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        parallel = method.merge(pre, as_experts(fts))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert_state_dict_close(parallel, sequential, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("option", "value"),
    [("steps", -1), ("lr", 0.0), ("lr", -1e-5), ("lr", float("inf")), ("other_keys", "mean")],
)
def test_wudi_bad_values_name_the_option(option, value):
    with pytest.raises(FusionBenchError, match=rf"method\.{option}="):
        Wudi(**{option: value})


def test_wudi_and_cart_need_an_expert(pool):
    pre, _ = pool
    for method in (Wudi(), Cart()):
        with pytest.raises(FusionBenchError, match="at least one expert"):
            method.merge(pre, {})


# --- CART: θ̄ + λ Σ_t SVD_k(θ_t − θ̄), the oracle with torch.linalg.svd --------------------------
def dense_cart(pre, fts, scaling, ratio, fuse_qkv=True):
    out = {}
    groups = [QKV] if fuse_qkv else [[k] for k in QKV]
    groups += [[OUT], [FC1], [FC2]]
    for keys in groups:
        thetas = [torch.cat([f[k].double() for k in keys]) for f in fts]
        average = sum(thetas) / len(thetas)
        r = min(average.shape)
        k = 0 if ratio == 0 else r if ratio == 1 else max(1, int(ratio * r))
        low = torch.zeros_like(average)
        for theta in thetas:
            u, s, vh = torch.linalg.svd(theta - average, full_matrices=False)
            low += u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
        merged = average + scaling * low
        for key, part in zip(keys, merged.split([pre[k].shape[0] for k in keys]), strict=True):
            out[key] = part.float()
    for k in pre:
        if k not in out:
            floating = pre[k].is_floating_point()
            out[k] = (pre[k].double() + mean_tau(pre, fts, k)).float() if floating else pre[k]
    return out


def test_cart_equals_the_dense_svd_oracle(pool):
    pre, fts = pool
    for scaling, ratio, fuse in [(2.0, 0.12, True), (1.5, 0.3, True), (0.7, 0.5, False)]:
        out = Cart(scaling_factor=scaling, rank_ratio=ratio, group_qkv=fuse).merge(
            pre, as_experts(fts)
        )
        assert_state_dict_close(out, dense_cart(pre, fts, scaling, ratio, fuse))


def test_cart_fused_qkv_is_the_authors_in_proj(pool):
    pre, fts = pool
    grouped = Cart(rank_ratio=0.2).merge(pre, as_experts(fts))
    on_fused = Cart(rank_ratio=0.2).merge(fused(pre), as_experts([fused(f) for f in fts]))
    assert_state_dict_close(fused(grouped), on_fused)


def test_cart_ends_of_the_rank_range_are_weight_averaging(pool):
    """Rank 0 adds nothing; at full rank the centred vectors sum to zero (the paper's point:
    both ends are weight averaging). λ = 0 and a single expert (θ̄ = θ_1) too."""
    pre, fts = pool
    average = SimpleAverage().merge(pre, as_experts(fts))
    for method in (Cart(rank_ratio=0.0), Cart(rank_ratio=1.0), Cart(scaling_factor=0.0)):
        assert_state_dict_close(method.merge(pre, as_experts(fts)), average)
    # one below full rank goes through the SVD path and is still θ̄ + λ Σ (θ_t − θ̄) minus the
    # last direction of each: compare with the oracle
    out = Cart(rank_ratio=0.95).merge(pre, as_experts(fts))
    assert_state_dict_close(out, dense_cart(pre, fts, 2.0, 0.95))
    assert_state_dict_close(Cart().merge(pre, as_experts(fts[:1])), fts[0])


def test_cart_kept_rank_is_the_authors_rule():
    assert kept_rank(0.12, 768) == 92  # ⌊92.16⌋
    assert kept_rank(0.001, 768) == 1  # at least one direction
    assert (kept_rank(0.0, 768), kept_rank(1.0, 768)) == (0, 768)


def test_cart_realistic_shape_ill_conditioned_matches_dense_svd():
    """768×768 experts sharing singular vectors, θ_t = Q1 diag(s ⊙ (1 + u_t)) Q2ᵀ with s log-spaced
    over 7 decades: the centred matrices θ_t − θ̄ = Q1 diag(s ⊙ (u_t − ū)) Q2ᵀ are as ill-conditioned.
    k = 92 (rank_ratio 0.12) is inside the Gram path's certified range, k = 691 (0.9) is past it
    (the kernel computes the float64 SVD). Errors are relative to λ Σ_t ‖SVD_k(θ_t − θ̄)‖ (near full
    rank the sum itself cancels to the discarded tails, where the float32 output's rounding
    dominates any relative measure)."""
    g = torch.Generator().manual_seed(7)
    n, tasks, f64 = 768, 3, torch.float64
    key = "blocks.0.mlp.fc1.weight"
    q1, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=f64))
    q2, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=f64))
    s = 1e-2 * torch.logspace(0, -7, n, dtype=f64)
    pre = {key: torch.zeros(n, n)}  # θ = τ: the float32 output rounds at ~1e-7 of the update
    fts = []
    for _ in range(tasks):
        factor = 1 + 0.5 * (2 * torch.rand(n, generator=g, dtype=f64) - 1)
        fts.append({key: ((q1 * (s * factor)) @ q2.T).float()})
    thetas = [f[key].double() for f in fts]
    average = sum(thetas) / tasks
    for ratio in (0.12, 0.9):
        out = Cart(rank_ratio=ratio).merge(pre, as_experts(fts))[key].double()
        k = kept_rank(ratio, n)
        low, scale = torch.zeros_like(average), 0.0
        for theta in thetas:
            u, sv, vh = torch.linalg.svd(theta - average, full_matrices=False)
            term = (u[:, :k] * sv[:k]) @ vh[:k]
            low, scale = low + term, scale + float(term.norm())
            assert (sv[k - 1] < 1e-5 * sv[0]) == (ratio == 0.9)  # which path the kernel takes
        error = float((out - average - 2.0 * low).norm()) / (2.0 * scale)
        print(f"rank_ratio {ratio}: relative error {error:.2e}")
        assert error < 1e-5, (ratio, error)


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_cart_bad_rank_ratio_names_the_option(value):
    with pytest.raises(FusionBenchError, match=r"method\.rank_ratio="):
        Cart(rank_ratio=value)
