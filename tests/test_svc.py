"""SVC (singular value calibration) against a dense float64 re-statement of its rule with
``torch.linalg.svd`` (the oracle), closed forms derived from the rule, a realistic-shape check,
bad options, and streaming memory."""

from __future__ import annotations

import math

import pytest
import torch

import fusion_bench
from fusion_bench.errors import FusionBenchError
from fusion_bench.method.svc import SingularValueCalibration
from fusion_bench.method.task_arithmetic import TaskArithmetic
from fusion_bench.method.tsv_m import TsvM
from fusion_bench.testing import as_experts, assert_state_dict_close, experts_around
from tests.test_memory import EXPERT_MIB, checkpoints, merge_mib  # noqa: F401 (a fixture)


def make_state(seed: int, scale: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "attn.weight": scale * torch.randn(12, 20, generator=g),  # wide
        "mlp.weight": scale * torch.randn(24, 12, generator=g),  # tall
        "mlp.bias": scale * torch.randn(24, generator=g),
        "pos_ids": torch.arange(4),
    }


@pytest.fixture
def pool():
    return experts_around(make_state, 0.1)


def svc(base: str = "task_arithmetic", alpha: float = 0.1, **base_options):
    return SingularValueCalibration(base=base, base_options=base_options, alpha=alpha)


# --- the oracle: the rule, written out with a full float64 SVD -----------------------------------
def dense_calibration(pre, fts, merged, alpha):
    """Per 2-D weight (FusionBench's loop version, Algorithm 1): ΔM = U diag(σ) Vᵀ;
    a_r^M = u_rᵀ ΔM, a_r^i = u_rᵀ τ_i; s_r^i = ⟨a_r^M, a_r^i⟩ / max(‖a_r^i‖², 1e-12);
    γ_r = K / Σ_i max(α, s_r^i); θ = θ0 + U diag(γ σ) Vᵀ. Other tensors: the base's."""
    out = dict(merged)
    for key, value in merged.items():
        if not value.is_floating_point() or value.dim() != 2:
            continue
        w0 = pre[key].double()
        delta = value.double() - w0
        u, sigma, vh = torch.linalg.svd(delta, full_matrices=False)
        gamma = torch.zeros_like(sigma)
        for r in range(sigma.numel()):
            a_merge = u[:, r] @ delta
            total = 0.0
            for f in fts:
                a_task = u[:, r] @ (f[key].double() - w0)
                s = (a_merge @ a_task) / max(float(a_task @ a_task), 1e-12)
                total += max(alpha, float(s))
            gamma[r] = len(fts) / total
        out[key] = (w0 + (u * (gamma * sigma)) @ vh).float()
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_equals_the_dense_oracle_after_task_arithmetic(pool):
    pre, fts = pool
    for lam, alpha in [(0.3, 0.1), (1.0, 0.5), (0.5, 1.0)]:
        out = svc(alpha=alpha, scaling_factor=lam).merge(pre, as_experts(fts))
        merged = TaskArithmetic(scaling_factor=lam).merge(pre, as_experts(fts))
        assert_state_dict_close(out, dense_calibration(pre, fts, merged, alpha))


@pytest.mark.parametrize(
    "base, options, alpha",
    [
        ("tsv_m", {}, 1.0),
        ("tsv_m", {"scaling_factor": 0.8}, 0.3),
        ("ties_merging", {"scaling_factor": 0.5, "threshold": 40}, 0.1),
        ("simple_average", {}, 0.1),
    ],
)
def test_equals_the_dense_oracle_after_other_bases(pool, base, options, alpha):
    pre, fts = pool
    out = svc(base, alpha, **options).merge(pre, as_experts(fts))
    merged = fusion_bench.merge(base, pre, fts, **options)
    assert_state_dict_close(out, dense_calibration(pre, fts, merged, alpha))
    # only the singular values of the 2-D task matrices change; the rest is the base's
    assert torch.equal(out["mlp.bias"], merged["mlp.bias"])
    assert torch.equal(out["pos_ids"], pre["pos_ids"])
    for key in ("attn.weight", "mlp.weight"):
        u, _, vh = torch.linalg.svd(merged[key].double() - pre[key].double())
        off_diagonal = u.T @ (out[key].double() - pre[key].double()) @ vh.T
        largest = off_diagonal.abs().max()
        off_diagonal.diagonal().zero_()  # U, V of the base's ΔM still diagonalise the result
        assert off_diagonal.abs().max() <= 1e-5 * largest


def test_presets_are_fusionbenchs(pool):
    pre, fts = pool
    ta = fusion_bench.merge("svc", pre, fts)  # λ = 0.3, α = 0.1
    merged = TaskArithmetic(scaling_factor=0.3).merge(pre, as_experts(fts))
    assert_state_dict_close(ta, dense_calibration(pre, fts, merged, 0.1))
    tsv = fusion_bench.merge("svc_tsv_m", pre, fts)  # TSV-M at 1.0, α = 1.0
    merged = TsvM(scaling_factor=1.0).merge(pre, as_experts(fts))
    assert_state_dict_close(tsv, dense_calibration(pre, fts, merged, 1.0))


# --- closed forms ----------------------------------------------------------------------------------
def test_one_expert_is_restored_when_lambda_reaches_alpha(pool):
    # One expert, task arithmetic: ΔM = λ τ, so s_r = λ for every r and γ_r = 1 / max(α, λ).
    # λ ≥ α: the 2-D weights are the expert's own; λ < α: θ0 + (λ / α) τ.
    pre, fts = pool
    expert = fts[0]
    for lam, alpha in [(0.3, 0.1), (0.3, 0.3), (2.0, 0.5)]:
        out = svc(alpha=alpha, scaling_factor=lam).merge(pre, as_experts([expert]))
        for key in ("attn.weight", "mlp.weight"):
            torch.testing.assert_close(out[key], expert[key], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(
            out["mlp.bias"], pre["mlp.bias"] + lam * (expert["mlp.bias"] - pre["mlp.bias"])
        )
    out = svc(alpha=0.5, scaling_factor=0.2).merge(pre, as_experts([expert]))
    for key in ("attn.weight", "mlp.weight"):
        expected = pre[key] + (0.2 / 0.5) * (expert[key] - pre[key])
        torch.testing.assert_close(out[key], expected, atol=1e-6, rtol=1e-5)


def test_shared_knowledge_counted_n_times_is_counted_once(pool):
    # N identical experts: ΔM = N λ τ, s_r^i = N λ, γ_r = 1 / (N λ) when N λ ≥ α: the expert.
    pre, fts = pool
    same = [fts[1]] * 4
    out = svc(alpha=0.1, scaling_factor=0.3).merge(pre, as_experts(same))
    for key in ("attn.weight", "mlp.weight"):
        torch.testing.assert_close(out[key], fts[1][key], atol=1e-6, rtol=1e-5)


def block_disjoint_pool(n_tasks: int = 3):
    """Experts whose task matrices live in disjoint row and column blocks (rank ≤ 4 each): their
    singular directions do not overlap, and TSV-M reduces to their plain sum."""
    g = torch.Generator().manual_seed(7)
    pre = {"w": torch.randn(12, 15, generator=g), "b": torch.randn(12, generator=g)}
    experts = []
    for t in range(n_tasks):
        tau = torch.zeros(12, 15)
        tau[4 * t : 4 * t + 4, 5 * t : 5 * t + 5] = torch.randn(4, 5, generator=g)
        experts.append({"w": pre["w"] + tau, "b": pre["b"] + 0.1 * torch.randn(12, generator=g)})
    return pre, experts


def test_disjoint_tasks_closed_form():
    # Direction u_r of task j: s_r^j = λ, s_r^i = 0 for i ≠ j, so every γ_r = N / (max(α, λ) +
    # (N − 1) α) and the calibrated task matrix is γ λ Σ τ_i.
    pre, fts = block_disjoint_pool()
    n = len(fts)
    for lam, alpha in [(0.3, 0.1), (1.0, 0.2), (0.5, 1.0)]:
        out = svc(alpha=alpha, scaling_factor=lam).merge(pre, as_experts(fts))
        gamma = n / (max(alpha, lam) + (n - 1) * alpha)
        total = sum(f["w"] - pre["w"] for f in fts)
        torch.testing.assert_close(out["w"], pre["w"] + gamma * lam * total, atol=1e-6, rtol=1e-5)


def test_a_base_that_keeps_each_tasks_spectrum_is_left_unchanged():
    # Disjoint tasks merged at full strength (TSV-M, or task arithmetic with λ = 1): every
    # s_r^i is 1 (own task) or 0; with α = 1 (the TSV-M preset) every γ_r = 1.
    pre, fts = block_disjoint_pool()
    for name, base in [("svc_tsv_m", "tsv_m"), ("svc_tsv_m", "task_arithmetic")]:
        options = {} if base == "tsv_m" else {"scaling_factor": 1.0}
        merged = fusion_bench.merge(base, pre, fts, **options)
        out = fusion_bench.merge(name, pre, fts, base=base, base_options=options)
        assert_state_dict_close(out, merged)


def test_alpha_above_every_coefficient_divides_the_task_matrix(pool):
    # max(α, s) = α for all r, i: γ_r = 1 / α.
    pre, fts = pool
    merged = TaskArithmetic(scaling_factor=0.3).merge(pre, as_experts(fts))
    out = svc(alpha=50.0, scaling_factor=0.3).merge(pre, as_experts(fts))
    for key in ("attn.weight", "mlp.weight"):
        expected = pre[key] + (merged[key] - pre[key]) / 50.0
        torch.testing.assert_close(out[key], expected, atol=1e-6, rtol=1e-5)


def test_keys_the_base_kept_and_uncalibrated_keys(pool):
    pre, fts = pool
    out = svc(exclude_keys=["attn.*"]).merge(pre, as_experts(fts))
    assert torch.equal(out["attn.weight"], pre["attn.weight"])  # ΔM = 0: nothing to scale
    method = SingularValueCalibration(uncalibrated_keys=["mlp.*"])
    merged = TaskArithmetic(scaling_factor=0.3).merge(pre, as_experts(fts))
    out = method.merge(pre, as_experts(fts))
    assert torch.equal(out["mlp.weight"], merged["mlp.weight"])
    assert not torch.allclose(out["attn.weight"], merged["attn.weight"])


# --- realistic shapes, float64 -----------------------------------------------------------------------
def realistic_pool(m: int, n: int, n_experts: int, seed: int):
    """θ0 + a shared rank-2 component (over-counted by task arithmetic) + a rank-8 task update +
    dense noise, ViT-B/32 magnitudes (issue 18's construction)."""
    g = torch.Generator().manual_seed(seed)
    pre = {"w": torch.randn(m, n, generator=g) * 0.02}
    common = torch.randn(m, 2, generator=g) @ torch.randn(2, n, generator=g) * 3e-3 / math.sqrt(2)
    experts = []
    for _ in range(n_experts):
        low = torch.randn(m, 8, generator=g) @ torch.randn(8, n, generator=g)
        noise = torch.randn(m, n, generator=g) * 2e-4
        experts.append({"w": pre["w"] + common + low * 2e-3 / math.sqrt(8) + noise})
    return pre, experts


@pytest.mark.parametrize("shape, n_experts", [((768, 768), 8), ((3072, 768), 4)])
def test_realistic_shapes_match_the_dense_oracle(shape, n_experts):
    pre, fts = realistic_pool(*shape, n_experts, seed=sum(shape))
    merged = TaskArithmetic(scaling_factor=0.3).merge(pre, as_experts(fts))
    out = svc(alpha=0.1, scaling_factor=0.3).merge(pre, as_experts(fts))
    expected = vectorised_oracle(pre["w"], [f["w"] for f in fts], merged["w"], 0.1)
    assert rel(out["w"].double() - pre["w"].double(), expected - pre["w"].double()) <= 1e-5
    # the shared component is over-counted by task arithmetic and calibrated down
    top = torch.linalg.svdvals(merged["w"].double() - pre["w"].double())[:2]
    assert (torch.linalg.svdvals(out["w"].double() - pre["w"].double())[:2] < top).all()


def test_ill_conditioned_task_matrices_match_the_dense_oracle():
    # θ0 = 0, so ΔM is exactly representable. The experts share singular vectors U, V with
    # spectra over 6 decades, s_t(r) = 10^(−6 r / 767) (1 + sin(r / 50 + t) / 4): ΔM = U diag(σ) Vᵀ
    # with σ = 0.3 Σ_t s_t, and the rule gives s_r^t = σ_r / s_t(r) in closed form.
    g = torch.Generator().manual_seed(11)
    m = n = 768
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    r = torch.arange(m, dtype=torch.float64)
    spectra = [
        torch.logspace(0, -6, m, dtype=torch.float64) * (1 + torch.sin(r / 50 + t) / 4)
        for t in range(4)
    ]
    pre = {"w": torch.zeros(m, n)}
    fts = [{"w": ((u * s) @ v.T).float()} for s in spectra]
    merged = TaskArithmetic(scaling_factor=0.3).merge(pre, as_experts(fts))
    sigma = torch.linalg.svdvals(merged["w"].double())
    assert sigma[0] / sigma[-1] > 1e5  # past the Gram path's certified range
    out = svc(alpha=0.1, scaling_factor=0.3).merge(pre, as_experts(fts))
    expected = vectorised_oracle(pre["w"], [f["w"] for f in fts], merged["w"], 0.1)
    assert rel(out["w"].double(), expected) <= 1e-5
    total = 0.3 * sum(spectra)
    gamma = len(spectra) / sum((total / s).clamp_min(0.1) for s in spectra)
    assert rel(out["w"].double(), (u * (gamma * total)) @ v.T) <= 1e-5


def vectorised_oracle(w0, experts, merged, alpha):
    """:func:`dense_calibration` for one large key, with the loops over r as matrix products."""
    w0 = w0.double()
    delta = merged.double() - w0
    u, sigma, vh = torch.linalg.svd(delta, full_matrices=False)
    a_merge = u.T @ delta
    total = torch.zeros_like(sigma)
    for w in experts:
        a_task = u.T @ (w.double() - w0)
        s = (a_merge * a_task).sum(1) / (a_task * a_task).sum(1).clamp_min(1e-12)
        total += s.clamp_min(alpha)
    return w0 + (u * (len(experts) / total * sigma)) @ vh


# --- options -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, match",
    [
        ({"base": "no_such_merge"}, "method.base='no_such_merge'"),
        ({"base": "fisher_merging"}, "data-free merge"),
        ({"base": "individual"}, "data-free merge"),
        ({"base_options": {"scale": 0.3}}, "no hyper-parameter 'scale'"),
        (
            {"base_options": {"scaling_factor": "abc"}},
            r"method\.base_options\.scaling_factor='abc'",
        ),
        (
            {"base": "ties_merging", "base_options": {"merge_func": "nope"}},
            "method.base=.ties_merging.",
        ),
        ({"base_options": "abc"}, r"method\.base_options="),
        ({"alpha": 0.0}, r"method\.alpha=0\.0"),
        ({"alpha": -0.1}, r"method\.alpha=-0\.1"),
        ({"alpha": "abc"}, r"method\.alpha="),
    ],
)
def test_bad_options_name_the_option(options, match):
    from fusion_bench.api import build_method

    with pytest.raises(FusionBenchError, match=match):
        build_method("svc", options)


def test_no_experts_and_memory_estimate(pool):
    pre, _ = pool
    with pytest.raises(FusionBenchError, match="at least one expert"):
        svc().merge(pre, {})
    assert svc().models_held(8) == 1.0


def test_parallel_calibration_equals_sequential(pool):
    pre, fts = pool
    sequential = svc(alpha=0.2).merge(pre, as_experts(fts))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        parallel = svc(alpha=0.2).merge(pre, as_experts(fts))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert_state_dict_close(parallel, sequential)


def test_peak_rss_does_not_grow_with_experts(checkpoints):  # noqa: F811 (the fixture)
    pretrained, experts = checkpoints
    few, many = merge_mib("svc", pretrained, experts[:4]), merge_mib("svc", pretrained, experts)
    print(f"svc: merge peak +{few:.1f} MiB (4 experts), +{many:.1f} MiB (16 experts)")
    assert many - few < 0.1 * 12 * EXPERT_MIB, (few, many)
