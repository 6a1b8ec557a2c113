"""Iso-CTS against a dense float64 re-statement of the paper's equations with ``torch.linalg.svd``
(the oracle), its closed-form special cases (fraction 1 = Iso-C, one expert = Iso-C, α = 0 = θ0),
an ill-conditioned 768×768 pool, and its option checks."""

from __future__ import annotations

import math
import sys

import pytest
import torch

import fusion_bench
from fusion_bench.api import build_method
from fusion_bench.errors import FusionBenchError
from fusion_bench.method.iso_c import IsoC
from fusion_bench.method.iso_cts import IsoCTS, subspace_sizes
from fusion_bench.spectral import GRAM_CONDITION_LIMIT
from fusion_bench.testing import as_experts, assert_state_dict_close, experts_around
from tests.test_memory import EXPERT_MIB, checkpoints, merge_mib  # noqa: F401 (a fixture)

F64 = torch.float64


def make_state(seed: int, scale: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "attn.weight": scale * torch.randn(12, 20, generator=g),  # wide, r = 12
        "mlp.weight": scale * torch.randn(30, 16, generator=g),  # tall, r = 16
        "mlp.bias": scale * torch.randn(30, generator=g),
        "text_projection": scale * torch.randn(6, 6, generator=g),
        "pos_ids": torch.arange(4),
    }


MATRICES = ("attn.weight", "mlp.weight")


@pytest.fixture
def pool():
    return experts_around(make_state, 0.1)


def svd64(a: torch.Tensor):
    return torch.linalg.svd(a.to(F64), full_matrices=False)


def polar64(a: torch.Tensor) -> torch.Tensor:
    p, _, q = svd64(a)
    return p @ q


# --- the oracle: the paper's equations, dense, float64 ---------------------------------------------
def dense_delta(taus: list[torch.Tensor], fraction: float) -> torch.Tensor:
    """Iso-CTS's Δ_iso for one weight from its float64 task matrices.

    Sizes as the authors' code: k₀ = ⌊f r⌋, d = round((r − k₀)/N) per task, k = r − N d.
    Common subspace: top-k of Σ τ_t. Task t: top-d of (I − U_k U_kᵀ) τ_t. The task blocks are
    stacked BEFORE the common one (the authors' order; the polar factors make the order
    irrelevant). Δ = mean(kept σ) · polar(U) polar(V).
    """
    n_tasks = len(taus)
    r = min(taus[0].shape)
    k0 = math.floor(r * fraction)
    d = round((r - k0) / n_tasks)
    k = r - n_tasks * d
    u, s, vh = svd64(sum(taus))
    uc, sc, vc = u[:, :k], s[:k], vh[:k]
    us, ss, vs = [], [], []
    for tau in taus:
        ut, st, vt = svd64(tau - uc @ uc.T @ tau)
        us.append(ut[:, :d]), ss.append(st[:d]), vs.append(vt[:d])
    u_all = torch.cat([*us, uc], dim=1)
    s_all = torch.cat([*ss, sc])
    v_all = torch.cat([*vs, vc], dim=0)
    assert u_all.shape[1] == r and v_all.shape[0] == r
    return s_all.mean() * polar64(u_all) @ polar64(v_all)


def dense_iso_cts(pre: dict, fts: list[dict], alpha: float, fraction: float) -> dict:
    out = {"pos_ids": pre["pos_ids"]}
    for key in MATRICES:
        taus = [f[key].to(F64) - pre[key].to(F64) for f in fts]
        out[key] = (pre[key].to(F64) + alpha * dense_delta(taus, fraction)).float()
    for key in ("mlp.bias", "text_projection"):  # not 2-D / averaged like the authors' code
        out[key] = pre[key] + alpha * sum(f[key] - pre[key] for f in fts) / len(fts)
    return out


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.to(F64)
    return float((actual.to(F64) - expected).norm() / expected.norm())


# --- the sizes -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rank, n_tasks, fraction, sizes",
    [
        (768, 8, 0.8, (616, 19)),  # ViT-B matrices: ⌊614.4⌋ = 614, 154/8 = 19.25 → 19
        (1024, 8, 0.8, (816, 26)),  # ViT-L: ⌊819.2⌋ = 819, 205/8 = 25.625 → 26
        (64, 4, 0.8, (52, 3)),  # benchmarks' small arch: 51, 13/4 → 3
        (50, 8, 0.8, (42, 1)),  # B/32 position embedding, 8 tasks: 40, 10/8 → 1
        (50, 20, 0.8, (50, 0)),  # 10/20 = 0.5 rounds half to even: 0, the key is Iso-C
        (16, 3, 0.5, (7, 3)),  # 8/3 = 2.67 rounds up: the common part shrinks to 7
        (12, 3, 1.0, (12, 0)),  # fraction 1: Iso-C
        (12, 3, 0.0, (0, 4)),  # fraction 0: task-specific subspaces only
        (2, 3, 0.0, (-1, 1)),  # more task directions than the rank: refused by the merge
    ],
)
def test_subspace_sizes_follow_the_authors_rounding(rank, n_tasks, fraction, sizes):
    assert subspace_sizes(rank, n_tasks, fraction) == sizes


# --- the maths -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.0])
def test_equals_the_dense_float64_restatement(pool, fraction):
    pre, fts = pool
    for alpha in (1.0, 0.6):
        out = IsoCTS(scaling_factor=alpha, common_space_fraction=fraction).merge(
            pre, as_experts(fts)
        )
        assert_state_dict_close(out, dense_iso_cts(pre, fts, alpha, fraction))


def test_the_spectrum_is_flat_at_the_mean_of_the_kept_singular_values(pool):
    pre, fts = pool
    out = IsoCTS(scaling_factor=1.0).merge(pre, as_experts(fts))
    for key in MATRICES:
        taus = [f[key].to(F64) - pre[key].to(F64) for f in fts]
        k, d = subspace_sizes(min(pre[key].shape), len(fts), 0.8)
        assert d > 0  # the pool exercises the task-specific part
        u, s, _ = svd64(sum(taus))
        kept = [s[:k]] + [torch.linalg.svdvals(t - u[:, :k] @ u[:, :k].T @ t)[:d] for t in taus]
        s_out = torch.linalg.svdvals((out[key] - pre[key]).to(F64))
        mean = torch.cat(kept).mean()
        torch.testing.assert_close(s_out, torch.full_like(s_out, mean), rtol=1e-5, atol=0)


def test_fraction_one_is_iso_c_exactly(pool):
    pre, fts = pool
    for alpha in (1.0, 1.3):
        ours = IsoCTS(scaling_factor=alpha, common_space_fraction=1.0).merge(pre, as_experts(fts))
        iso_c = IsoC(scaling_factor=alpha).merge(pre, as_experts(fts))
        assert set(ours) == set(iso_c)
        for key in iso_c:
            assert torch.equal(ours[key], iso_c[key]), key


def test_alpha_zero_gives_the_pretrained_model(pool):
    pre, fts = pool
    out = IsoCTS(scaling_factor=0.0).merge(pre, as_experts(fts))
    assert set(out) == set(pre)
    for key in pre:
        assert torch.equal(out[key], pre[key]), key


@pytest.mark.parametrize("fraction", [0.8, 0.3, 0.0])
def test_one_expert_is_iso_c_of_that_expert(pool, fraction):
    # N = 1: the residual's top r − k directions are the rest of τ's own singular directions, so
    # the stacked bases are τ's U and V and Iso-CTS flattens τ's whole spectrum, like Iso-C.
    pre, fts = pool
    ours = IsoCTS(scaling_factor=1.0, common_space_fraction=fraction).merge(
        pre, as_experts(fts[:1])
    )
    assert_state_dict_close(ours, IsoC(scaling_factor=1.0).merge(pre, as_experts(fts[:1])))


def test_task_vectors_inside_the_common_subspace_add_nothing_task_specific():
    # Rank-1 task matrices (small integers: exact in float32, so exactly rank 1): Σ τ has rank
    # 3 ≤ k = 9, every τ_t lies in the common subspace and its residual is float64 rounding
    # noise. That noise is no direction (it would otherwise get the full flattened weight σ̄):
    # the result is Iso-C, whose Σ τ is the same rank-3 matrix.
    g = torch.Generator().manual_seed(4)
    pre = {"w": torch.randint(-4, 5, (12, 20), generator=g).float()}
    fts = [
        {
            "w": pre["w"]
            + torch.randint(-3, 4, (12, 1), generator=g).float()
            @ torch.randint(-3, 4, (1, 20), generator=g).float()
        }
        for _ in range(3)
    ]
    assert subspace_sizes(12, 3, 0.8) == (9, 1)
    ours = IsoCTS(scaling_factor=1.0).merge(pre, as_experts(fts))
    assert_state_dict_close(ours, IsoC(scaling_factor=1.0).merge(pre, as_experts(fts)))
    assert int(torch.linalg.matrix_rank((ours["w"] - pre["w"]).double(), rtol=1e-5)) == 3


def test_average_and_exclude_keys(pool):
    pre, fts = pool
    out = IsoCTS(average_keys=["*"], exclude_keys=["mlp.bias"]).merge(pre, as_experts(fts))
    expected = {k: pre[k] + sum(f[k] - pre[k] for f in fts) / len(fts) for k in MATRICES}
    expected |= {"text_projection": out["text_projection"], "pos_ids": pre["pos_ids"]}
    assert_state_dict_close(out, {**expected, "mlp.bias": pre["mlp.bias"]})


def test_parallel_equals_sequential_and_each_expert_is_read_when_needed(pool):
    pre, fts = pool
    reads: dict[tuple[str, str], int] = {}

    class Counting(dict):  # an expert whose reads are counted per key
        def __init__(self, name, state):
            super().__init__(state)
            self.name = name

        def __getitem__(self, key):
            reads[(self.name, key)] = reads.get((self.name, key), 0) + 1
            return super().__getitem__(key)

    experts = {f"#{i}": Counting(f"#{i}", f) for i, f in enumerate(fts)}
    sequential = IsoCTS().merge(pre, experts)
    # a 2-D key: read for the sum, then for its residual; other keys once
    assert reads == {
        (name, key): 2 if key in MATRICES else 1
        for name in experts
        for key in pre
        if pre[key].is_floating_point()
    }
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        parallel = IsoCTS().merge(pre, as_experts(fts))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    for key in sequential:
        assert torch.equal(parallel[key], sequential[key]), key


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status (Linux)")
def test_peak_rss_does_not_grow_with_experts(checkpoints):  # noqa: F811
    # tests/test_memory.py's probe: 8 keys of 256×512 read lazily from safetensors files, 4 then
    # 16 experts, in fresh processes. Holding the experts of a key would add 12 × 0.5 MiB per key
    # held; the bound is a tenth of holding every expert (the N residual bases of a key fill r
    # directions together, whatever N).
    pretrained, experts = checkpoints
    few = merge_mib("iso_cts", pretrained, experts[:4])
    many = merge_mib("iso_cts", pretrained, experts)
    assert many - few < 0.1 * 12 * EXPERT_MIB, (few, many)


# --- realistic shape, ill-conditioned --------------------------------------------------------------
def with_spectrum(m: int, n: int, s: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=F64))
    return (u * s) @ v.T


def block_rotation(r: int, seed: int) -> torch.Tensor:
    """A random rotation of each pair of coordinates (2i, 2i+1): mixes neighbours only."""
    g = torch.Generator().manual_seed(seed)
    angle = (torch.rand(r // 2, generator=g, dtype=F64) - 0.5) * math.pi
    out, i = torch.zeros(r, r, dtype=F64), torch.arange(0, r, 2)
    out[i, i], out[i, i + 1], out[i + 1, i], out[i + 1, i + 1] = (
        angle.cos(),
        -angle.sin(),
        angle.sin(),
        angle.cos(),
    )
    return out


def ill_conditioned_taus(kind: str) -> list[torch.Tensor]:
    """Four 768×768 task matrices with condition number 1e7 (log-spaced spectra), float32.

    ``independent``: a shared component weighted per task + a task-specific one with its own
    singular vectors (the sum is better conditioned: ~1e5). ``shared_blocks``: one pair of
    singular bases rotated per task within neighbouring pairs of directions, so the tasks differ
    but the sum keeps the 1e7 spread (σ_k/σ_max ≈ 2e-6 at the common subspace's edge, past the
    Gram path's certified 1e-5: the kernel's exact SVD fallback is exercised; the stacked bases
    are conditioned ~1.5e6)."""
    spectrum = torch.logspace(0, -7, 768, dtype=F64) * 1e-2
    if kind == "independent":
        shared = with_spectrum(768, 768, spectrum, seed=100)
        own = [with_spectrum(768, 768, 0.3 * spectrum, seed=t) for t in range(4)]
        return [((1 + 0.25 * t) * shared + own[t]).float() for t in range(4)]
    g = torch.Generator().manual_seed(100)
    u, _ = torch.linalg.qr(torch.randn(768, 768, generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(768, 768, generator=g, dtype=F64))
    return [
        ((u @ block_rotation(768, 10 + t) * spectrum) @ (v @ block_rotation(768, 20 + t)).T).float()
        for t in range(4)
    ]


@pytest.mark.parametrize("kind", ["independent", "shared_blocks"])
def test_ill_conditioned_768_matches_the_float64_restatement(kind):
    # θ0 = 0 so that the check measures the merge, not the float32 rounding of θ0 + Δ.
    pre = {"w": torch.zeros(768, 768)}
    fts = [{"w": tau} for tau in ill_conditioned_taus(kind)]
    taus = [f["w"].to(F64) for f in fts]
    s = torch.linalg.svdvals(taus[0])
    assert s[0] / s[-1] > 5e6  # as stored (float32), each task matrix is this ill-conditioned
    if kind == "shared_blocks":
        total = torch.linalg.svdvals(sum(taus))
        k, _ = subspace_sizes(768, 4, 0.8)
        assert total[k - 1] / total[0] < 1 / GRAM_CONDITION_LIMIT
    out = fusion_bench.merge("iso_cts", pre, fts, scaling_factor=1.0)
    assert rel(out["w"], dense_delta(taus, 0.8)) <= 1e-5  # measured 2.5e-8 / 5.6e-8


# --- options -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fraction", [-0.1, 1.5, 80.0])
def test_a_fraction_outside_zero_one_is_refused(fraction):
    with pytest.raises(FusionBenchError, match="common_space_fraction"):
        IsoCTS(common_space_fraction=fraction)
    with pytest.raises(FusionBenchError, match="common_space_fraction"):
        build_method("iso_cts", {"common_space_fraction": fraction})


def test_more_task_directions_than_the_rank_is_refused():
    pre = {"w": torch.zeros(2, 6)}  # rank 2; fraction 0 and 3 experts: 1 direction each, 3 > 2
    fts = [{"w": torch.randn(2, 6, generator=torch.Generator().manual_seed(i))} for i in range(3)]
    with pytest.raises(FusionBenchError, match="average_keys"):
        IsoCTS(common_space_fraction=0.0).merge(pre, as_experts(fts))
    with pytest.raises(FusionBenchError, match="at least one expert"):
        IsoCTS().merge(pre, {})
