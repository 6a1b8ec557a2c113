"""Consensus merging (TALL masks) and PCB-Merging against dense float64 re-statements of the
authors' code on the flattened model (the oracles), and their closed-form special cases."""

from __future__ import annotations

import pytest
import torch

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.consensus import Consensus, consensus_votes
from fusion_bench.method.pcb_merging import BalancingScores, PCBMerging
from fusion_bench.method.task_arithmetic import TaskArithmetic
from fusion_bench.method.ties_merging import TiesMerging
from fusion_bench.tensor_ops import task_vector_sum
from fusion_bench.testing import as_experts, assert_state_dict_close
from tests.test_cli import run_cli

FLOAT_KEYS = ("a.weight", "a.bias", "b.weight")


def make_state(seed: int, scale: float = 1.0, rows: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": scale * torch.randn(rows, 7, generator=g),
        "a.bias": scale * torch.randn(rows, generator=g),
        "b.weight": scale * torch.randn(8, generator=g),
        "pos_ids": torch.arange(4),  # integer buffer: copied from θ0
    }


def expert_of(pre: dict, tau: dict) -> dict:
    return {k: pre[k] + tau[k] if pre[k].is_floating_point() else pre[k].clone() for k in pre}


def make_pool(n: int = 3, scale: float = 0.1, rows: int = 5) -> tuple[dict, list[dict]]:
    pre = make_state(0, rows=rows)
    return pre, [expert_of(pre, make_state(i, scale, rows)) for i in range(1, n + 1)]


@pytest.fixture
def pool():
    return make_pool()


def flat(state: dict) -> torch.Tensor:
    return torch.cat([state[k].double().reshape(-1) for k in FLOAT_KEYS])


def unflat(pre: dict, vector: torch.Tensor) -> dict:
    out, start = {"pos_ids": pre["pos_ids"]}, 0
    for k in FLOAT_KEYS:
        size = pre[k].numel()
        out[k] = vector[start : start + size].view_as(pre[k]).float()
        start += size
    return out


# --- the oracles: the authors' steps, dense, float64, on the flattened model --------------------
def dense_ties(tv: torch.Tensor, threshold: float = 20) -> torch.Tensor:
    """The TIES reference (top-k per task over the whole vector, sign election with the majority
    rule, disjoint sum): the authors' ties_merging(reset_thresh=20, merge_func='dis-sum')."""
    n, d = tv.shape
    kth = tv.abs().kthvalue(d - int(d * threshold / 100), dim=1, keepdim=True).values
    trimmed = tv * (tv.abs() >= kth)
    signs = torch.sign(trimmed.sum(0))
    signs[signs == 0] = torch.sign(signs.sum())
    return (trimmed * torch.where(signs > 0, trimmed > 0, trimmed < 0)).sum(0)


def dense_consensus(pre, fts, alpha, lambdas, k, base="task_arithmetic"):
    """The authors' ``create_task_vector`` for method 'consensus' (tall_masks, aggregation.py):
    multi-task vector (sum, or TIES with use_ties), TALL masks |θ0 − θ_t| > λ_t |θ_MTL − θ_t|,
    consensus mask Σ_t m_t ≥ k, then θ0 + α · merged ⊙ mask."""
    ptm = flat(pre)
    ft = torch.stack([flat(f) for f in fts])
    tv = ft - ptm
    merged = tv.sum(0) if base == "task_arithmetic" else dense_ties(tv)
    multi = ptm + merged
    masks = [(ptm - ft[t]).abs() > (multi - ft[t]).abs() * lam for t, lam in enumerate(lambdas)]
    consensus = torch.stack(masks).sum(0) >= k
    return unflat(pre, ptm + alpha * merged * consensus)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Per-row min–max normalisation (the reference's ``normalize(x, 1)``); 1 where max = min."""
    low, high = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
    return torch.where(high > low, (x - low) / (high - low), torch.ones_like(x))


def dense_pcb(pre, fts, lambdas, pcb_ratio, clip_ratio, dtype=torch.float64):
    """The authors' PCB_merge (pcb-merging.py) with their per-task ``lams``: sort-based quantile
    clamps, exp(N·norm(|τ|)²) · tanh(τ ⊙ Σ τ), drop below the (1 − r) quantile, min–max rescale,
    weighted average of the clamped task vectors. ``dtype=torch.float32``: in the reference's
    precision (the same ties where tanh saturates, see the test below)."""
    tv = (torch.stack([flat(f) for f in fts]) - flat(pre)).to(dtype)
    n, d = tv.shape
    ordered = tv.abs().sort(dim=1).values
    low = ordered[:, int(d * clip_ratio)].unsqueeze(1)
    high = ordered[:, int(d * (1 - clip_ratio) - 1)].unsqueeze(1)
    magnitude = torch.clamp(tv.abs(), low, high)
    scores = torch.exp(n * normalize(magnitude) ** 2) * torch.tanh(tv * tv.sum(0))
    ordered = scores.sort(dim=1).values
    threshold = ordered[:, min(int(d * (1 - pcb_ratio)), d - 1)].unsqueeze(1)
    weight = normalize(torch.clamp(scores, threshold, ordered[:, -1:]))
    clamped = torch.sign(tv) * magnitude * torch.tensor(lambdas, dtype=dtype)[:, None]
    merged = (clamped * weight).sum(0) / weight.sum(0).clamp(min=1e-12)
    return unflat(pre, flat(pre) + merged.double())


# --- consensus -----------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 1, 2, 3])
@pytest.mark.parametrize("lambdas", [0.4, [0.2, 0.5, 0.6]])
def test_consensus_task_arithmetic_equals_dense_reference(pool, k, lambdas):
    pre, fts = pool
    method = Consensus(scaling_factor=0.7, tall_mask_lambda=lambdas, k=k)
    per_task = lambdas if isinstance(lambdas, list) else [lambdas] * 3
    expected = dense_consensus(pre, fts, 0.7, per_task, k)
    assert_state_dict_close(method.merge(pre, as_experts(fts)), expected)


@pytest.mark.parametrize("k", [1, 2])
def test_consensus_ties_equals_dense_reference(pool, k):
    """Consensus TIES: the mask is built from and applied to the TIES vector (authors' order)."""
    pre, fts = pool
    method = Consensus(base="ties_merging", scaling_factor=0.5, k=k)
    expected = dense_consensus(pre, fts, 0.5, [0.4] * 3, k, base="ties_merging")
    assert_state_dict_close(method.merge(pre, as_experts(fts)), expected)


def test_consensus_with_task_arithmetic_merges_the_masked_task_vectors(pool):
    """The mask is shared by the tasks, so masking Σ τ_t equals task arithmetic on m ⊙ τ_t."""
    pre, fts = pool
    ptm, tv = flat(pre), torch.stack([flat(f) for f in fts]) - flat(pre)
    multi = ptm + tv.sum(0)
    votes = sum(tv[t].abs() > (multi - (ptm + tv[t])).abs() * 0.4 for t in range(3))
    masked = [expert_of(pre, unflat(pre, tv[t] * (votes >= 2))) for t in range(3)]
    expected = TaskArithmetic(scaling_factor=0.3).merge(pre, as_experts(masked))
    assert_state_dict_close(Consensus().merge(pre, as_experts(fts)), expected)


def test_consensus_votes_and_k_by_hand():
    """Five entries, λ = 1/4, exact binary fractions: votes (3, 1, 3, 0, 2)."""
    taus = torch.tensor(
        [[1.0, 2.0, 1.0, 0.0, 1.0], [1.0, 0.0, -1.0, 0.0, -0.5], [1.0, 0.0, 0.5, 0.0, 0.0]]
    )
    pre = {"w": torch.zeros(5)}
    fts = [{"w": t.clone()} for t in taus]
    multi = taus.sum(0)  # (3, 2, 0.5, 0, 0.5)
    votes = consensus_votes(pre["w"], multi, as_experts(fts), "w", [0.25] * 3)
    assert votes.tolist() == [3, 1, 3, 0, 2]
    for k, keep in [(0, [1, 1, 1, 1, 1]), (1, [1, 1, 1, 0, 1]), (2, [1, 0, 1, 0, 1])]:
        out = Consensus(scaling_factor=0.5, tall_mask_lambda=0.25, k=k).merge(pre, as_experts(fts))
        assert torch.equal(out["w"], 0.5 * multi * torch.tensor(keep, dtype=torch.float32))
    for k in (3, 4):
        out = Consensus(scaling_factor=0.5, tall_mask_lambda=0.25, k=k).merge(pre, as_experts(fts))
        assert torch.equal(out["w"], 0.5 * multi * torch.tensor([1.0, 0, 1, 0, 0]) * (k == 3))


def test_consensus_k1_keeps_what_some_task_marks_and_k_above_n_gives_theta0(pool):
    pre, fts = pool
    ptm, tv = flat(pre), torch.stack([flat(f) for f in fts]) - flat(pre)
    multi = ptm + tv.sum(0)
    marked = torch.stack([tv[t].abs() > (multi - (ptm + tv[t])).abs() * 1.0 for t in range(3)])
    out = Consensus(scaling_factor=1.0, tall_mask_lambda=1.0, k=1).merge(pre, as_experts(fts))
    delta = flat(out) - ptm
    some = marked.any(0)
    assert torch.all(delta[~some] == 0)
    torch.testing.assert_close(delta[some], tv.sum(0)[some], atol=1e-6, rtol=1e-5)
    assert (~some).any() and some.any()  # both cases occur
    for k in (4, 10):
        assert_state_dict_close(Consensus(k=k).merge(pre, as_experts(fts)), pre, atol=0, rtol=0)


@pytest.mark.parametrize(
    "base, reference",
    [("task_arithmetic", TaskArithmetic(scaling_factor=0.6)), ("ties_merging", TiesMerging(0.6))],
)
def test_consensus_k0_is_the_base_merge(pool, base, reference):
    pre, fts = pool
    out = Consensus(base=base, scaling_factor=0.6, k=0).merge(pre, as_experts(fts))
    assert_state_dict_close(out, reference.merge(pre, as_experts(fts)))


def test_consensus_base_options_exclude_keys_and_zero_scale(pool):
    pre, fts = pool
    method = Consensus(base="ties_merging", base_options={"threshold": 50}, scaling_factor=0.5)
    expected_ties = dense_ties(torch.stack([flat(f) for f in fts]) - flat(pre), threshold=50)
    assert method.base_method() == TiesMerging(1.0, 50, "sum", [])  # unit scale, own keys
    out = method.merge(pre, as_experts(fts))
    assert (flat(out) - flat(pre)).abs().max() <= 0.5 * expected_ties.abs().max() + 1e-6
    out = Consensus(exclude_keys=["a.*"]).merge(pre, as_experts(fts))
    for key in ("a.weight", "a.bias", "pos_ids"):
        assert torch.equal(out[key], pre[key])
    assert not torch.equal(out["b.weight"], pre["b.weight"])
    assert_state_dict_close(Consensus(scaling_factor=0.0).merge(pre, as_experts(fts)), pre)


def test_consensus_bad_options_are_clear_errors(pool):
    pre, fts = pool
    with pytest.raises(FusionBenchError, match=r"method\.k=-1"):
        Consensus(k=-1)
    with pytest.raises(FusionBenchError, match="tall_mask_lambda"):
        Consensus(tall_mask_lambda=[0.4, -0.1])
    with pytest.raises(FusionBenchError, match="method.scaling_factor"):
        Consensus(base_options={"scaling_factor": 0.3})
    with pytest.raises(FusionBenchError, match="method.base='no_such_merge'"):
        Consensus(base="no_such_merge")
    with pytest.raises(FusionBenchError, match="method.base='fisher_merging'"):
        Consensus(base="fisher_merging")
    with pytest.raises(FusionBenchError, match="method.base='ties_merging'.*thresh"):
        Consensus(base="ties_merging", base_options={"thresh": 20})
    with pytest.raises(FusionBenchError, match="tall_mask_lambda has 2 values for 3 experts"):
        Consensus(tall_mask_lambda=[0.4, 0.4]).merge(pre, as_experts(fts))


# --- PCB-Merging ---------------------------------------------------------------------------------
@pytest.mark.parametrize("pcb_ratio", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("clip_ratio", [0.0, 1e-4, 0.05])
@pytest.mark.parametrize("scale", [0.1, 2.0])  # tanh nearly linear / saturated
def test_pcb_equals_dense_reference(pcb_ratio, clip_ratio, scale):
    """Against the float64 re-statement; where tanh saturates (τ ~ 2) the clamped entries score
    exactly e^N in float32, and whether the top scores tie (M = q: every weight 1) or not (weights
    0 or 1) is decided by rounding: there the float32 re-statement is the reference."""
    pre, fts = make_pool(n=3, scale=scale)
    method = PCBMerging(scaling_factor=[1.2, 0.8, 1.0], pcb_ratio=pcb_ratio, clip_ratio=clip_ratio)
    dtype = torch.float32 if scale > 1 else torch.float64
    expected = dense_pcb(pre, fts, [1.2, 0.8, 1.0], pcb_ratio, clip_ratio, dtype)
    assert_state_dict_close(method.merge(pre, as_experts(fts)), expected)


def test_pcb_equals_dense_reference_at_a_realistic_size():
    """~400k entries (a 512×768 matrix among them): the radix selection's bincount path, and
    quantile clamps that bind (c = 1e-4 of 400k entries)."""
    pre, fts = make_pool(n=4, scale=0.01, rows=512 * 768 // 7)
    method = PCBMerging()
    expected = dense_pcb(pre, fts, [1.2] * 4, 0.05, 1e-4)
    assert_state_dict_close(method.merge(pre, as_experts(fts)), expected)


@pytest.mark.parametrize("pcb_ratio", [0.9, 0.05])  # q_i among the negative / positive scores
def test_pcb_streamed_thresholds_are_the_sorted_values(pool, pcb_ratio):
    pre, fts = pool
    experts = as_experts(fts)
    keys = list(FLOAT_KEYS)
    scores = BalancingScores(pre, experts, keys, lambda ks: ks)
    numel = sum(pre[k].numel() for k in keys)
    scores.clamp_bounds(1e-4, numel)
    thresholds, maxima = scores.drop_thresholds(pcb_ratio, numel)
    per_task = [[] for _ in fts]
    for key in keys:
        base = pre[key].float()
        total = task_vector_sum(experts, key, base)
        for i, tau in scores.task_vectors(key, base):
            per_task[i].append(scores.of(i, tau, total)[0].reshape(-1).clone())
    for i, parts in enumerate(per_task):
        ordered = torch.cat(parts).sort().values
        assert torch.equal(thresholds[i], ordered[int(numel * (1 - pcb_ratio))])
        assert torch.equal(maxima[i], ordered[-1])
        assert (thresholds[i] < 0) == (pcb_ratio == 0.9)


def test_pcb_equal_scores_give_the_average():
    """τ_i = c_i · s (one sign pattern s): every |τ_i| and every score of a task is equal, the
    paper's rescaling weights the tasks equally: θ0 + Σ_i λ_i τ_i / N, for any pcb_ratio."""
    g = torch.Generator().manual_seed(5)
    pre = {k: torch.randint(-8, 8, (6, 5), generator=g) / 8 for k in ("w", "v")}
    signs = {k: torch.randint(0, 2, (6, 5), generator=g) * 2.0 - 1 for k in pre}
    c = [0.25, -0.125, 0.5]
    fts = [{k: pre[k] + ci * signs[k] for k in pre} for ci in c]
    lambdas = [1.0, 2.0, 0.5]
    expected = {
        k: pre[k] + sum(lam * ci for lam, ci in zip(lambdas, c, strict=True)) * signs[k] / 3
        for k in pre
    }
    for pcb_ratio in (0.05, 0.5, 1.0):
        out = PCBMerging(scaling_factor=lambdas, pcb_ratio=pcb_ratio).merge(pre, as_experts(fts))
        assert_state_dict_close(out, expected)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("pcb_ratio", [0.2, 1.0])
def test_pcb_identical_experts_keep_their_top_magnitudes(n, pcb_ratio):
    """N identical experts (or one): the score grows with |τ|, so PCB keeps the entries whose |τ|
    is above the one at rank ⌊D(1 − r)⌋ and merges them at λ τ: a magnitude top-k trim."""
    pre, (ft,) = make_pool(n=1, scale=0.3)
    out = PCBMerging(scaling_factor=0.9, pcb_ratio=pcb_ratio, clip_ratio=0.0).merge(
        pre, as_experts([ft] * n)
    )
    tau = flat(ft) - flat(pre)
    kth = tau.abs().sort().values[int(tau.numel() * (1 - pcb_ratio))]
    expected = unflat(pre, flat(pre) + 0.9 * tau * (tau.abs() > kth))
    assert_state_dict_close(out, expected)


def test_pcb_zero_scale_zero_task_vector_and_excluded_keys(pool):
    pre, fts = pool
    assert_state_dict_close(PCBMerging(scaling_factor=0.0).merge(pre, as_experts(fts)), pre)
    # an expert equal to θ0: no NaN (the reference's 0/0); it weighs like any task, with τ = 0
    with_zero = [*fts, {k: v.clone() for k, v in pre.items()}]
    out = PCBMerging().merge(pre, as_experts(with_zero))
    assert all(t.isfinite().all() for t in out.values() if t.is_floating_point())
    assert_state_dict_close(out, dense_pcb(pre, with_zero, [1.2] * 4, 0.05, 1e-4))
    out = PCBMerging(exclude_keys=["a.*"]).merge(pre, as_experts(fts))
    for key in ("a.weight", "a.bias", "pos_ids"):
        assert torch.equal(out[key], pre[key])
    assert not torch.equal(out["b.weight"], pre["b.weight"])


def test_pcb_bad_options_are_clear_errors(pool):
    pre, fts = pool
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(FusionBenchError, match=r"method\.pcb_ratio"):
            PCBMerging(pcb_ratio=bad)
    for bad in (-1e-4, 0.5):
        with pytest.raises(FusionBenchError, match=r"method\.clip_ratio"):
            PCBMerging(clip_ratio=bad)
    with pytest.raises(FusionBenchError, match="scaling_factor has 2 values for 3 experts"):
        PCBMerging(scaling_factor=[1.0, 1.0]).merge(pre, as_experts(fts))


@pytest.mark.parametrize(
    "overrides", [["method=consensus", "method.base=ties_merging"], ["method=pcb_merging"]]
)
def test_runs_from_the_cli(overrides, open_clip_cli_args, tmp_path, capsys):
    code, out, err = run_cli(
        [
            *open_clip_cli_args,
            *overrides,
            "logger=none",
            "fast_dev_run=true",
            f"hydra.run.dir={tmp_path}",
        ],
        capsys,
    )
    assert code == 0, err[-3000:]
    assert f"== {overrides[0].split('=')[1]} ==" in out
