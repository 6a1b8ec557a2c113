"""The spectral kernel (fusion_bench/spectral.py) against the float64 full SVD, on the matrices
that broke the old Gram-only shortcut: ill-conditioned squares, shared weak components,
rank-deficient inputs, repeated singular values, wide and tall shapes, at realistic sizes.
And the two reproductions of issue 18 through ``fusion_bench.merge``."""

from __future__ import annotations

import math

import pytest
import torch

import fusion_bench
from fusion_bench import spectral
from fusion_bench.spectral import GRAM_CONDITION_LIMIT, polar_factor, top_singular_triplets

TOL = 1e-5  # relative (Frobenius) to the float64 re-statement


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return float((actual.double() - expected).norm() / expected.norm().clamp(min=1e-300))


def reference_svd(a: torch.Tensor):
    """LAPACK's float64 thin SVD (computed on the tall orientation: the same, faster)."""
    a = a.double()
    if a.shape[0] < a.shape[1]:
        v, s, uh = torch.linalg.svd(a.T, full_matrices=False)
        return uh.T, s, v.T
    return torch.linalg.svd(a, full_matrices=False)


def with_spectrum(m: int, n: int, s: torch.Tensor, seed: int) -> torch.Tensor:
    """float32 U diag(s) Vᵀ with random orthonormal U, V (float64 QR)."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    return ((u * s.double()) @ v.T).float()


def log_spectrum(r: int, condition: float) -> torch.Tensor:
    return torch.logspace(0, -math.log10(condition), r, dtype=torch.float64)


SHAPES = [(768, 768), (3072, 768), (768, 3072), (200, 50)]
CONDITIONS = [1e2, 1e4, 1e6, 1e8, 1e11]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("condition", CONDITIONS, ids=lambda c: f"cond{c:.0e}")
def test_polar_factor_is_exact_whatever_the_conditioning(shape, condition):
    a = with_spectrum(*shape, log_spectrum(min(shape), condition), seed=int(math.log10(condition)))
    u, s, vh = reference_svd(a)
    q, qs = polar_factor(a)
    assert rel(q, u @ vh) <= TOL
    assert rel(qs, s) <= TOL


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("condition", CONDITIONS, ids=lambda c: f"cond{c:.0e}")
def test_top_k_triplets_are_exact_whatever_the_conditioning(shape, condition):
    r = min(shape)
    k = r // 8
    spectrum = log_spectrum(r, condition)
    spectrum[k:] *= 0.5  # a gap after σ_k: the truncation itself is well defined
    a = with_spectrum(*shape, spectrum, seed=7)
    u, s, vh = reference_svd(a)
    tu, ts, tvh = top_singular_triplets(a, k)
    assert rel((tu * ts) @ tvh, (u[:, :k] * s[:k]) @ vh[:k]) <= TOL
    assert rel(ts, s[:k]) <= TOL
    # each vector, not only their product (signs are arbitrary in any SVD)
    signs = torch.sign((tu.double() * u[:, :k]).sum(0))
    assert rel(tu * signs, u[:, :k]) <= TOL and rel(tvh * signs[:, None], vh[:k]) <= TOL


def test_shared_weak_component_and_dense_noise():
    """A weak direction shared by stacked factors (TSV-M's failure mode)."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(768, 768, generator=g) * 2e-4
    weak = (torch.randn(768, 2, generator=g) @ torch.randn(2, 768, generator=g)) * 1e-9
    a = base + weak
    u, s, vh = reference_svd(a)
    q, _ = polar_factor(a)
    assert rel(q, u @ vh) <= TOL


def test_repeated_singular_values():
    """An orthogonal matrix times c: σ all equal, its polar factor is the matrix itself."""
    g = torch.Generator().manual_seed(2)
    o, _ = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64))
    a = (3.0 * o).float()
    q, s = polar_factor(a)
    assert rel(q, o) <= TOL and torch.allclose(
        s, torch.full((300,), 3.0, dtype=torch.float64), rtol=1e-6
    )
    tu, ts, tvh = top_singular_triplets(a, 10)  # the top-10 of a flat spectrum: any 10 directions
    assert torch.allclose(ts, torch.full((10,), 3.0, dtype=torch.float64), rtol=1e-6)
    assert rel(tu.T @ tu, torch.eye(10)) <= TOL and rel(tvh @ tvh.T, torch.eye(10)) <= TOL


@pytest.mark.parametrize("shape", [(500, 300), (300, 500)], ids=["tall", "wide"])
def test_rank_deficient_input_gives_the_partial_isometry(shape):
    """Exactly rank r: the polar factor is U_r V_rᵀ (null space mapped to 0), triplets past the
    rank are zero — the defined answer where the SVD's vectors are arbitrary."""
    g = torch.Generator().manual_seed(4)
    rank = 40
    a = torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)
    a[:, :7], a[:7, :] = 0.0, 0.0  # and exactly zero rows and columns
    u, s, vh = reference_svd(a)
    assert int((s > s[0] * 1e-6).sum()) == rank  # float32 rounding sits far below 1e-6 σ_max
    keep = s > s[0] * max(shape) * torch.finfo(torch.float64).eps  # the documented tolerance
    assert 0 < int((~keep).sum())  # the zero columns: exactly zero singular values
    q, _ = polar_factor(a)
    assert rel(q, u[:, keep] @ vh[keep]) <= TOL
    # the null spaces (zero rows / columns) map to 0, up to the float32-rounding directions' error
    assert q[:, :7].abs().max() < 1e-6 and q[:7, :].abs().max() < 1e-6
    exact = torch.zeros(shape)  # an exactly rank-deficient float64-representable input
    exact[:rank, :rank] = torch.diag(torch.arange(1.0, rank + 1))
    q, s = polar_factor(exact)
    projector = torch.zeros(shape)
    projector[:rank, :rank] = torch.eye(rank)
    assert torch.equal(q, projector) or rel(q, projector) <= 1e-12
    tu, ts, tvh = top_singular_triplets(exact, rank + 5)
    assert torch.all(ts[rank:] == 0) and torch.all(tu[:, rank:] == 0) and torch.all(tvh[rank:] == 0)
    assert rel((tu * ts) @ tvh, exact) <= 1e-7


def test_zero_and_degenerate_inputs():
    q, s = polar_factor(torch.zeros(5, 3))
    assert torch.equal(q, torch.zeros(5, 3)) and torch.equal(s, torch.zeros(3))
    u, s, vh = top_singular_triplets(torch.zeros(4, 6), 2)
    assert not u.any() and not s.any() and not vh.any()
    u, s, vh = top_singular_triplets(torch.randn(4, 6), 9)  # k > rank: padded with zeros
    assert u.shape == (4, 9) and s.shape == (9,) and vh.shape == (9, 6) and not s[4:].any()


def test_gram_path_is_used_only_where_certified(monkeypatch):
    calls = []
    original = spectral.svd
    monkeypatch.setattr(spectral, "svd", lambda a: calls.append(a.shape) or original(a))
    good = with_spectrum(200, 100, log_spectrum(100, GRAM_CONDITION_LIMIT / 10), seed=0)
    polar_factor(good)
    top_singular_triplets(good, 10)
    assert calls == []
    bad = with_spectrum(200, 100, log_spectrum(100, GRAM_CONDITION_LIMIT * 100), seed=0)
    polar_factor(bad)
    top_singular_triplets(bad, 10)  # the top 10 are well conditioned: still the Gram path
    assert len(calls) == 1
    top_singular_triplets(bad, 100)
    assert len(calls) == 2


# -- issue 18's reproductions, through the methods ------------------------------------------------
def repro_pool(shared: bool):
    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.randn(768, 768, generator=g) * 0.02}
    experts = []
    for _ in range(8):
        low = torch.randn(768, 8, generator=g) @ torch.randn(8, 768, generator=g)
        experts.append(
            {"w": pre["w"] + torch.randn(768, 768, generator=g) * 2e-4 + low * 2e-3 / math.sqrt(8)}
        )
    if shared:
        g1 = torch.Generator().manual_seed(1)
        common = torch.randn(768, 2, generator=g1) @ torch.randn(2, 768, generator=g1)
        experts = [{"w": e["w"] + common * 3e-3 / math.sqrt(2)} for e in experts]
    return pre, experts


def test_iso_c_reproduction_is_exact():
    pre, experts = repro_pool(shared=False)
    total = sum((e["w"].double() - pre["w"].double()) for e in experts)
    u, s, vh = reference_svd(total.float())
    expected = s.mean() * u @ vh
    merged = fusion_bench.merge("iso_c", pre, experts, scaling_factor=1.0, average_keys=[])
    assert rel(merged["w"].double() - pre["w"].double(), expected) <= TOL


def test_tsv_m_reproduction_is_exact():
    pre, experts = repro_pool(shared=True)
    taus = [(e["w"].double() - pre["w"].double()) for e in experts]  # exact differences
    k = 768 // 8
    u_all, s_all, v_all = [], [], []
    for tau in taus:
        u, s, vh = reference_svd(tau)
        u_all.append(u[:, :k]), s_all.append(s[:k]), v_all.append(vh[:k])
    u_all, s_all, v_all = torch.cat(u_all, 1), torch.cat(s_all), torch.cat(v_all, 0)
    pu, ps, qu = reference_svd(u_all)
    assert ps[-1] / ps[0] < 1e-5  # the stacked U is as ill-conditioned as the issue says
    pv, _, qv = reference_svd(v_all)
    expected = (pu @ qu * s_all) @ (pv @ qv)
    merged = fusion_bench.merge("tsv_m", pre, experts, scaling_factor=1.0, average_keys=[])
    assert rel(merged["w"].double() - pre["w"].double(), expected) <= TOL


# -- parity at realistic size (slow: ~3 GB of state dicts, minutes of float64 SVDs) ---------------
def b32_shaped_pool(n_experts: int = 8):
    """The 2-D weights of a ViT-B/32 image tower (12 blocks: q, k, v, out 768×768, fc1 3072×768,
    fc2 768×3072), experts = θ0 + a rank-8 update + dense noise (issue 18's construction)."""
    g = torch.Generator().manual_seed(0)
    shapes = {}
    for layer in range(12):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"encoder.layers.{layer}.self_attn.{proj}.weight"] = (768, 768)
        shapes[f"encoder.layers.{layer}.mlp.fc1.weight"] = (3072, 768)
        shapes[f"encoder.layers.{layer}.mlp.fc2.weight"] = (768, 3072)
    pre = {k: torch.randn(*s, generator=g) * 0.02 for k, s in shapes.items()}
    experts = []
    for _ in range(n_experts):
        expert = {}
        for k, (m, n) in shapes.items():
            low = torch.randn(m, 8, generator=g) @ torch.randn(8, n, generator=g)
            expert[k] = pre[k] + torch.randn(m, n, generator=g) * 2e-4 + low * 2e-3 / math.sqrt(8)
        experts.append(expert)
    return pre, experts


@pytest.mark.slow
def test_b32_shaped_pool_matches_the_float64_restatement():
    pre, experts = b32_shaped_pool()
    iso = fusion_bench.merge("iso_c", pre, experts, average_keys=[])
    tsv = fusion_bench.merge("tsv_m", pre, experts, average_keys=[])
    checked = [k for k in pre if k.startswith(("encoder.layers.0.", "encoder.layers.11."))]
    for key in checked:
        taus = [e[key].double() - pre[key].double() for e in experts]
        u, s, vh = reference_svd(sum(taus))
        assert rel(iso[key].double() - pre[key].double(), s.mean() * u @ vh) <= TOL, key
        k = min(pre[key].shape) // len(taus)
        parts = [reference_svd(t) for t in taus]
        u_all = torch.cat([p[0][:, :k] for p in parts], 1)
        s_all = torch.cat([p[1][:k] for p in parts])
        v_all = torch.cat([p[2][:k] for p in parts], 0)
        pu, _, qu = reference_svd(u_all)
        pv, _, qv = reference_svd(v_all)
        expected = (pu @ qu * s_all) @ (pv @ qv)
        assert rel(tsv[key].double() - pre[key].double(), expected) <= TOL, key
