"""TSV-M and Iso-C against dense re-statements of the papers' equations with
``torch.linalg.svd`` (the oracle), and their closed-form special cases."""

from __future__ import annotations

import pytest
import torch

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.iso_c import IsoC
from fusion_bench.method.task_arithmetic import TaskArithmetic
from fusion_bench.method.tsv_m import TsvM
from fusion_bench.spectral import polar_factor, top_singular_triplets
from fusion_bench.tensor_ops import parallel_map
from fusion_bench.testing import as_experts, assert_state_dict_close, experts_around


def make_state(seed: int, scale: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "attn.weight": scale * torch.randn(12, 20, generator=g),  # wide
        "mlp.weight": scale * torch.randn(24, 12, generator=g),  # tall
        "mlp.bias": scale * torch.randn(24, generator=g),
        "text_projection": scale * torch.randn(6, 6, generator=g),
        "pos_ids": torch.arange(4),
    }


@pytest.fixture
def pool():
    return experts_around(make_state, 0.1)


def mean_tau(pre, fts, key):
    return sum(f[key] - pre[key] for f in fts) / len(fts)


# --- the oracles: the papers' equations with a full SVD ----------------------------------------
def dense_tsv_m(pre, fts, alpha):
    out = {"pos_ids": pre["pos_ids"]}
    for key in ("attn.weight", "mlp.weight"):
        taus = [(f[key] - pre[key]).double() for f in fts]
        r = min(taus[0].shape)
        k = r // len(taus)
        blocks = [torch.linalg.svd(t, full_matrices=False) for t in taus]
        u = torch.zeros(taus[0].shape[0], r, dtype=torch.float64)
        s = torch.zeros(r, dtype=torch.float64)
        v = torch.zeros(r, taus[0].shape[1], dtype=torch.float64)
        for i, (ui, si, vi) in enumerate(blocks):
            u[:, i * k : (i + 1) * k], s[i * k : (i + 1) * k] = ui[:, :k], si[:k]
            v[i * k : (i + 1) * k] = vi[:k]
        pu, _, qu = torch.linalg.svd(u, full_matrices=False)
        pv, _, qv = torch.linalg.svd(v, full_matrices=False)
        out[key] = pre[key] + alpha * (pu @ qu @ torch.diag(s) @ pv @ qv).float()
    for key in ("mlp.bias", "text_projection"):
        out[key] = pre[key] + alpha * mean_tau(pre, fts, key)
    return out


def dense_iso_c(pre, fts, alpha):
    out = {"pos_ids": pre["pos_ids"]}
    for key in ("attn.weight", "mlp.weight"):
        total = sum((f[key] - pre[key]).double() for f in fts)
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        out[key] = pre[key] + alpha * (s.mean() * u @ vh).float()
    for key in ("mlp.bias", "text_projection"):
        out[key] = pre[key] + alpha * mean_tau(pre, fts, key)
    return out


def test_spectral_helpers_match_torch_svd():
    g = torch.Generator().manual_seed(3)
    for shape in [(9, 14), (14, 9), (10, 10)]:
        a = torch.randn(*shape, generator=g)
        u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
        tu, ts, tvh = top_singular_triplets(a, 4)
        torch.testing.assert_close(ts, s[:4])
        torch.testing.assert_close((tu * ts) @ tvh, (u[:, :4] * s[:4]) @ vh[:4])
        q, qs = polar_factor(a)
        torch.testing.assert_close(q, u @ vh)
        torch.testing.assert_close(qs, s)


def test_tsv_m_equals_dense_reference(pool):
    pre, fts = pool
    for alpha in (1.0, 0.4):
        out = TsvM(scaling_factor=alpha).merge(pre, as_experts(fts))
        assert_state_dict_close(out, dense_tsv_m(pre, fts, alpha))


def test_tsv_m_single_expert_and_lambda_zero(pool):
    pre, fts = pool
    assert_state_dict_close(TsvM(scaling_factor=0.0).merge(pre, as_experts(fts)), pre)
    # one expert: k = r, its singular vectors are already orthogonal: Δ = τ exactly
    assert_state_dict_close(TsvM(scaling_factor=1.0).merge(pre, as_experts(fts[:1])), fts[0])


def test_tsv_m_on_disjoint_subspaces_is_task_arithmetic():
    # Task matrices of rank ≤ k living in mutually orthogonal row and column subspaces: the
    # concatenated singular vectors are already orthogonal, so TSV-M adds them unchanged.
    g = torch.Generator().manual_seed(5)
    left, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    pre = {"w": torch.randn(12, 16, generator=g)}
    experts = []
    for t in range(3):  # r = 12, k = 4 per task
        s = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
        tau = left[:, 4 * t : 4 * t + 4] @ torch.diag(s) @ right[:, 4 * t : 4 * t + 4].T
        experts.append({"w": pre["w"] + tau.float()})
    assert_state_dict_close(
        TsvM(scaling_factor=0.7).merge(pre, as_experts(experts)),
        TaskArithmetic(scaling_factor=0.7).merge(pre, as_experts(experts)),
    )


def test_iso_c_equals_dense_reference(pool):
    pre, fts = pool
    for alpha in (1.0, 1.5):
        out = IsoC(scaling_factor=alpha).merge(pre, as_experts(fts))
        assert_state_dict_close(out, dense_iso_c(pre, fts, alpha))


def test_iso_c_flattens_the_spectrum_and_keeps_its_mean(pool):
    pre, fts = pool
    assert_state_dict_close(IsoC(scaling_factor=0.0).merge(pre, as_experts(fts)), pre)
    out = IsoC(scaling_factor=1.0).merge(pre, as_experts(fts))
    total = sum(f["mlp.weight"] - pre["mlp.weight"] for f in fts)
    s_in = torch.linalg.svdvals(total)
    s_out = torch.linalg.svdvals(out["mlp.weight"] - pre["mlp.weight"])
    torch.testing.assert_close(s_out, torch.full_like(s_out, s_in.mean().item()))
    # a task matrix whose spectrum is already flat (a scaled orthogonal matrix) is unchanged
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(1)))
    base = {"w": torch.zeros(8, 8)}
    flat = IsoC(scaling_factor=1.0).merge(base, as_experts([{"w": 0.3 * q}]))
    assert_state_dict_close(flat, {"w": 0.3 * q})


def test_average_keys_and_clear_errors(pool):
    pre, fts = pool
    averaged = TsvM(scaling_factor=1.0, average_keys=["*"])  # everything averaged
    out = averaged.merge(pre, as_experts(fts))  # the simple average
    expected = {k: pre[k] + mean_tau(pre, fts, k) for k in pre if k != "pos_ids"}
    assert_state_dict_close(out, {**expected, "pos_ids": pre["pos_ids"]})
    many = [fts[0]] * 13  # r = 12 for attn.weight: ⌊12 / 13⌋ = 0 singular vectors per task
    with pytest.raises(FusionBenchError, match="average_keys"):
        TsvM(scaling_factor=1.0).merge(pre, as_experts(many))


def test_parallel_decompositions_equal_sequential_and_restore_threads(pool):
    # the test suite runs torch on one thread (conftest), where parallel_map is a plain loop
    pre, fts = pool
    experts = as_experts(fts)
    methods = TsvM(scaling_factor=1.0), IsoC(scaling_factor=1.0)
    sequential = [m.merge(pre, experts) for m in methods]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        parallel = [m.merge(pre, experts) for m in methods]
        assert torch.get_num_threads() == 2
        assert parallel_map(lambda x: (x, torch.get_num_threads()), [1, 2, 3]) == [
            (1, 1),
            (2, 1),
            (3, 1),
        ]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    for seq, par in zip(sequential, parallel, strict=True):
        assert_state_dict_close(par, seq)
