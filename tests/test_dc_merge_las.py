"""DC-Merge and Localize-and-Stitch (dataless and learned masks) against dense re-statements of the
authors' steps (the oracles), and their closed-form special cases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import Context
from fusion_bench.method.dc_merge import DCMerge, keep_top_entries, smooth
from fusion_bench.method.iso_c import IsoC
from fusion_bench.method.localize_and_stitch import (
    LocalizeAndStitch,
    LocalizeAndStitchLearned,
    few_shot_sample,
    learn_mask_logits,
)
from fusion_bench.method.task_arithmetic import TaskArithmetic
from fusion_bench.taskpool.data import TaskData
from fusion_bench.testing import as_experts, assert_state_dict_close


def make_state(seed: int, scale: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "attn.weight": scale * torch.randn(12, 20, generator=g),  # wide, r = 12
        "mlp.weight": scale * torch.randn(24, 12, generator=g),  # tall
        "odd.weight": scale * torch.randn(10, 14, generator=g),  # r = 10: N·k < r with N = 3
        "mlp.bias": scale * torch.randn(24, generator=g),
        "text_projection": scale * torch.randn(6, 6, generator=g),
        "pos_ids": torch.arange(4),
    }


def make_pool(n: int = 3, scale: float = 0.1):
    pre = make_state(0)
    experts = []
    for i in range(1, n + 1):
        tau = make_state(i, scale)
        experts.append({k: pre[k] + tau[k] if k != "pos_ids" else pre[k] for k in pre})
    return pre, experts


def taus_of(pre, fts, key):
    return [(f[key] - pre[key]).double() for f in fts]


# --- DC-Merge: the oracle, the authors' steps with a full SVD -------------------------------------
def dense_smooth(s, smoothing, rho):
    if smoothing == "none":
        return s
    if smoothing == "average":
        return s.sum() * torch.ones_like(s) / len(s)
    ratio = min(rho, float(s[0] / s[-1]))
    shape = torch.linspace(ratio, 1.0, len(s), dtype=s.dtype)
    return s.sum() * shape / shape.sum()


def dense_dc_delta(taus, smoothing="none", rho=5.0, keep_fraction=1e-3):
    """DC_utils.dc_merge's steps: r×r cover spaces (zero-padded stacks), top entries of each
    projected matrix, TIES-style disjoint mean, block-diagonal mask."""
    n = len(taus)
    m, cols = taus[0].shape
    r = min(m, cols)
    k = r // n
    sum_u = torch.zeros(m, r, dtype=torch.float64)
    sum_v = torch.zeros(r, cols, dtype=torch.float64)
    truncated = []
    for i, tau in enumerate(taus):
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        sum_u[:, i * k : (i + 1) * k], sum_v[i * k : (i + 1) * k] = u[:, :k], vh[:k]
        truncated.append(u[:, :k] @ torch.diag(dense_smooth(s[:k], smoothing, rho)) @ vh[:k])
    uu, _, vu = torch.linalg.svd(sum_u, full_matrices=False)
    uv, _, vv = torch.linalg.svd(sum_v, full_matrices=False)
    cover_u, cover_vt = uu @ vu, uv @ vv
    ms = []
    for t in truncated:
        mi = cover_u.T @ t @ cover_vt.T  # r × r
        keep = max(1, int(keep_fraction * mi.numel()))
        threshold = torch.topk(mi.abs().reshape(-1), keep).values.min()
        ms.append(mi * (mi.abs() >= threshold))
    stacked = torch.stack(ms)
    total = stacked.sum(0)
    agree = torch.sign(stacked) == torch.sign(total)
    agg = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
    agg = torch.where(total == 0, torch.zeros_like(agg), agg)
    mask = torch.zeros_like(agg)
    for i in range(n):
        mask[i * k : (i + 1) * k, i * k : (i + 1) * k] = 1
    return cover_u @ (agg * mask) @ cover_vt


def dense_dc_merge(pre, fts, alpha=1.0, **options):
    out = {"pos_ids": pre["pos_ids"]}
    for key in ("attn.weight", "mlp.weight", "odd.weight"):
        out[key] = pre[key] + alpha * dense_dc_delta(taus_of(pre, fts, key), **options).float()
    for key in ("mlp.bias", "text_projection"):
        out[key] = pre[key] + alpha * sum(f[key] - pre[key] for f in fts) / len(fts)
    return out


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"keep_fraction": 1.0},
        {"smoothing": "average", "keep_fraction": 0.05},
        {"smoothing": "linear", "rho": 3.0, "keep_fraction": 0.2},
    ],
)
def test_dc_merge_equals_the_dense_restatement(options):
    pre, fts = make_pool(3)
    merged = DCMerge(scaling_factor=0.7, **options).merge(pre, as_experts(fts))
    assert_state_dict_close(merged, dense_dc_merge(pre, fts, 0.7, **options))


def test_dc_merge_alpha_zero_is_the_pretrained_model():
    pre, fts = make_pool(2)
    assert_state_dict_close(DCMerge(scaling_factor=0.0).merge(pre, as_experts(fts)), pre)


def test_dc_merge_of_one_expert():
    pre, fts = make_pool(1)
    # keep everything, no smoothing: M = diag(s) in the expert's own singular basis -> τ itself
    assert_state_dict_close(DCMerge(keep_fraction=1.0).merge(pre, as_experts(fts)), fts[0])
    # averaging smoothing: τ's singular vectors with a flat spectrum at the mean: Iso-C of τ
    flat = DCMerge(smoothing="average", keep_fraction=1.0, scaling_factor=0.6)
    iso = IsoC(scaling_factor=0.6).merge(pre, as_experts(fts))
    assert_state_dict_close(flat.merge(pre, as_experts(fts)), iso, atol=1e-5)
    # keep_fraction f of the r×r entries: the ⌊f r²⌋ largest singular values survive
    merged = DCMerge(keep_fraction=0.03).merge(pre, as_experts(fts))  # 12×20: ⌊0.03·144⌋ = 4
    u, s, vh = torch.linalg.svd(taus_of(pre, fts, "attn.weight")[0], full_matrices=False)
    expected = pre["attn.weight"] + ((u[:, :4] * s[:4]) @ vh[:4]).float()
    torch.testing.assert_close(merged["attn.weight"], expected, atol=1e-6, rtol=1e-5)


def orthogonal_experts(n=3, size=12, seed=0):
    """Experts whose task matrices have mutually orthogonal column and row spaces, rank size/n."""
    g = torch.Generator().manual_seed(seed)
    qu, _ = torch.linalg.qr(torch.randn(size, size, generator=g, dtype=torch.float64))
    qv, _ = torch.linalg.qr(torch.randn(size, size, generator=g, dtype=torch.float64))
    k = size // n
    taus, parts = [], []
    for i in range(n):
        s = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
        b = slice(i * k, (i + 1) * k)
        taus.append(((qu[:, b] * s) @ qv[:, b].T).float())
        parts.append((qu[:, b], s, qv[:, b]))
    pre = {"w": torch.randn(size, size, generator=g)}
    return pre, [{"w": pre["w"] + t} for t in taus], parts


def test_dc_merge_of_orthogonal_experts_is_task_arithmetic():
    pre, fts, parts = orthogonal_experts()
    # The stacked U, V are already orthonormal: M_i = diag(s_i) in block i and 0 elsewhere, so
    # no entry overlaps. Keeping the top 4 of 144 entries (⌊0.03·144⌋) keeps exactly those: with
    # all entries kept, the rounding-level non-zeros (~1e-17) of the other M_j would count in the
    # disjoint mean's denominator wherever their sign agrees.
    merged = DCMerge(keep_fraction=0.03).merge(pre, as_experts(fts))
    assert_state_dict_close(merged, TaskArithmetic(scaling_factor=1.0).merge(pre, as_experts(fts)))
    # with averaging smoothing: each task's directions at its mean singular value
    merged = DCMerge(keep_fraction=0.03, smoothing="average").merge(pre, as_experts(fts))
    expected = pre["w"] + sum((u * s.mean()) @ v.T for u, s, v in parts).float()
    torch.testing.assert_close(merged["w"], expected, atol=1e-6, rtol=1e-5)


def test_dc_merge_of_identical_experts_is_the_truncation_over_n():
    # U = U_k [I … I]: its polar factor U_k [I … I]/√N (the null directions get nothing), every
    # M_i = (1/N) [diag(s)]_{blocks}, the diagonal blocks give Δ = U_k diag(s) V_kᵀ / N
    pre, fts = make_pool(1)
    n = 3
    merged = DCMerge(keep_fraction=1.0).merge(pre, as_experts(fts * n))
    for key in ("attn.weight", "mlp.weight", "odd.weight"):
        u, s, vh = torch.linalg.svd(taus_of(pre, fts, key)[0], full_matrices=False)
        k = min(pre[key].shape) // n
        expected = pre[key] + ((u[:, :k] * s[:k]) @ vh[:k] / n).float()
        torch.testing.assert_close(merged[key], expected, atol=1e-6, rtol=1e-5)


def test_smoothing_rules():
    s = torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(smooth(s, "none", 5.0), s)
    torch.testing.assert_close(smooth(s, "average", 5.0), torch.full((3,), 7 / 3, dtype=s.dtype))
    # linear: ratio min(ρ, s1/sk) = 4, shape (4, 2.5, 1)/7.5, total 7 kept
    expected = 7 * torch.tensor([4.0, 2.5, 1.0], dtype=s.dtype) / 7.5
    torch.testing.assert_close(smooth(s, "linear", 5.0), expected)
    expected = 7 * torch.tensor([2.0, 1.5, 1.0], dtype=s.dtype) / 4.5  # ρ = 2 caps the ratio
    torch.testing.assert_close(smooth(s, "linear", 2.0), expected)
    torch.testing.assert_close(smooth(s, "linear", 1.0), smooth(s, "average", 1.0))
    zero_tail = torch.tensor([3.0, 0.0], dtype=torch.float64)  # s_k = 0: the ratio is ρ
    torch.testing.assert_close(
        smooth(zero_tail, "linear", 5.0), 3 * torch.tensor([5 / 6, 1 / 6]).double()
    )


def test_keep_top_entries_counts_the_padded_matrix():
    m = torch.tensor([[3.0, -1.0], [2.0, -2.0]])
    torch.testing.assert_close(keep_top_entries(m, 2), torch.tensor([[3.0, 0.0], [2.0, -2.0]]))
    torch.testing.assert_close(keep_top_entries(m, 4), m)
    torch.testing.assert_close(keep_top_entries(m, 9), m)  # more than it has: all (rest zeros)


def realistic_taus(n, shape, condition, shared, seed=0):
    """Task matrices with log-spaced spectra (σ_max/σ_min = condition); ``shared`` > 0 mixes in a
    common component, so the tasks' singular vectors overlap and the stacked U is ill-conditioned."""
    g = torch.Generator().manual_seed(seed)
    r = min(shape)
    spectrum = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), r).double()

    def matrix():
        u, _ = torch.linalg.qr(torch.randn(shape[0], r, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(shape[1], r, generator=g, dtype=torch.float64))
        return (u * spectrum) @ v.T

    common = matrix()
    return [(1e-2 * (shared * common + matrix())).float() for _ in range(n)]


@pytest.mark.parametrize(("condition", "shared"), [(1e7, 0.0), (1e3, 3.0)])
def test_dc_merge_realistic_shape_ill_conditioned(condition, shared):
    taus = realistic_taus(4, (768, 768), condition, shared)
    pre = {"w": torch.zeros(768, 768)}  # θ0 = 0: the output is Δ itself, no rounding of θ0 + Δ
    merged = DCMerge().merge(pre, as_experts([{"w": t} for t in taus]))["w"].double()
    expected = dense_dc_delta([t.double() for t in taus])
    assert float((merged - expected).norm() / expected.norm()) < 1e-5


def test_dc_merge_bad_options_name_the_option():
    for options, option in [
        ({"smoothing": "cubic"}, "smoothing"),
        ({"rho": 0.5}, "rho"),
        ({"keep_fraction": 0.0}, "keep_fraction"),
        ({"keep_fraction": 1.5}, "keep_fraction"),
    ]:
        with pytest.raises(FusionBenchError, match=option):
            DCMerge(**options)
    pre = {"w": torch.zeros(2, 3)}
    experts = [{"w": torch.randn(2, 3)} for _ in range(3)]  # ⌊2 / 3⌋ = 0 directions per task
    with pytest.raises(FusionBenchError, match="average_keys"):
        DCMerge().merge(pre, as_experts(experts))


# --- Localize-and-Stitch, dataless ----------------------------------------------------------------
def dense_localize_and_stitch(pre, fts, sparsity, exclude=()):
    keys = [k for k in pre if pre[k].is_floating_point() and k not in exclude]
    out = {k: pre[k].clone() for k in pre}
    total = {k: torch.zeros_like(pre[k]) for k in keys}
    count = {k: torch.zeros_like(pre[k]) for k in keys}
    for f in fts:
        taus = {k: f[k] - pre[k] for k in keys}
        flat = torch.cat([t.abs().reshape(-1) for t in taus.values()])
        k_keep = int(sparsity * flat.numel())
        threshold = torch.topk(flat, k_keep).values.min() if k_keep else float("inf")
        for k in keys:
            mask = (taus[k].abs() > threshold).float()
            total[k] += mask * taus[k]
            count[k] += mask
    for k in keys:
        out[k] = pre[k] + total[k] / count[k].clamp(min=1)
    return out


@pytest.mark.parametrize("sparsity", [0.05, 0.2, 0.5])
def test_localize_and_stitch_equals_the_dense_restatement(sparsity):
    pre, fts = make_pool(3)
    merged = LocalizeAndStitch(sparsity=sparsity).merge(pre, as_experts(fts))
    assert_state_dict_close(merged, dense_localize_and_stitch(pre, fts, sparsity))
    merged = LocalizeAndStitch(sparsity=sparsity, exclude_keys=["mlp.bias"]).merge(
        pre, as_experts(fts)
    )
    assert_state_dict_close(merged, dense_localize_and_stitch(pre, fts, sparsity, ["mlp.bias"]))


def test_localize_and_stitch_keep_all_is_the_mean_where_all_overlap():
    pre, fts = make_pool(3)
    fts[0]["mlp.bias"][:5] = pre["mlp.bias"][:5]  # τ_0 = 0 there (its smallest |τ|: never kept)
    for f in fts:
        f["text_projection"] = pre["text_projection"].clone()  # an untouched tensor
    merged = LocalizeAndStitch(sparsity=1.0).merge(pre, as_experts(fts))
    expected = {k: v.clone() for k, v in pre.items()}
    for key in ("attn.weight", "mlp.weight", "odd.weight", "mlp.bias"):
        expected[key] = pre[key] + sum(f[key] - pre[key] for f in fts) / 3  # mean of τ
    expected["mlp.bias"][:5] = (
        pre["mlp.bias"][:5] + sum(f["mlp.bias"][:5] - pre["mlp.bias"][:5] for f in fts[1:]) / 2
    )  # τ_0 = 0 there: the mean of the two others
    assert_state_dict_close(merged, expected)


def test_localize_and_stitch_of_disjoint_supports_is_task_arithmetic():
    g = torch.Generator().manual_seed(0)
    pre = {"a": torch.randn(6, 4, generator=g), "b": torch.randn(10, generator=g)}
    fts = []
    for i in range(3):  # expert i changes only entries ≡ i (mod 3) of the flattened model
        f = {}
        for key, value in pre.items():
            flat = value.clone().reshape(-1)
            positions = torch.arange(i, flat.numel(), 3)
            flat[positions] += torch.randn(len(positions), generator=g) + 2.0
            f[key] = flat.reshape(value.shape)
        fts.append(f)
    merged = LocalizeAndStitch(sparsity=1.0).merge(pre, as_experts(fts))
    assert_state_dict_close(merged, TaskArithmetic(scaling_factor=1.0).merge(pre, as_experts(fts)))


def test_localize_and_stitch_zero_sparsity_and_one_expert():
    pre, fts = make_pool(2)
    assert_state_dict_close(LocalizeAndStitch(sparsity=0.0).merge(pre, as_experts(fts)), pre)
    # one expert: θ0 + τ on its entries above the k-th largest |τ| (k − 1 entries), θ0 elsewhere
    merged = LocalizeAndStitch(sparsity=0.1).merge(pre, as_experts(fts[:1]))
    changed = sum(int((merged[k] != pre[k]).sum()) for k in pre if pre[k].is_floating_point())
    numel = sum(pre[k].numel() for k in pre if pre[k].is_floating_point())
    assert changed == int(0.1 * numel) - 1
    for key in ("attn.weight", "mlp.bias"):
        moved = merged[key] != pre[key]
        torch.testing.assert_close(merged[key][moved], fts[0][key][moved])


def test_localize_and_stitch_threshold_is_global_over_the_model():
    pre = {"small": torch.zeros(50), "large": torch.zeros(50)}
    expert = {"small": torch.full((50,), 1e-3), "large": torch.linspace(1.0, 2.0, 50)}
    merged = LocalizeAndStitch(sparsity=0.4).merge(pre, as_experts([expert]))  # k = 40
    torch.testing.assert_close(merged["small"], pre["small"])  # per tensor it would keep 40 %
    assert int((merged["large"] != 0).sum()) == 39  # the 39 largest (strictly above the 40th)


def test_localize_and_stitch_bad_sparsity():
    for value in (-0.1, 1.5):
        with pytest.raises(FusionBenchError, match="sparsity"):
            LocalizeAndStitch(sparsity=value)


# --- Localize-and-Stitch, learned masks ------------------------------------------------------------
@pytest.mark.parametrize("regularizer", ["reference", "paper"])
def test_mask_training_matches_the_update_by_hand(regularizer):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    theta0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    tau = {k: 0.5 * torch.randn_like(v) for k, v in theta0.items()}
    init = {k: torch.where(torch.rand_like(v) > 0.5, 5.0, -5.0) for k, v in theta0.items()}
    data = [
        (torch.randn(4, 4), torch.tensor([0, 1, 2, 0])),
        (torch.randn(2, 4), torch.tensor([1, 1])),
    ]
    lr, l1 = 3.0, 0.2
    learned = learn_mask_logits(
        model,
        theta0,
        tau,
        {k: v.clone() for k, v in init.items()},
        model,
        lambda epoch: iter(data),
        2,
        lr,
        l1,
        regularizer,
    )
    expected = {k: v.clone() for k, v in init.items()}
    for _ in range(2):

        def loss_at(params):
            return sum(
                nn.functional.cross_entropy(
                    nn.functional.linear(x, params["weight"], params["bias"]), y
                )
                for x, y in data
            )  # the sum of the per-batch mean losses

        params = {
            k: (theta0[k] + torch.sigmoid(expected[k]) * tau[k]).requires_grad_() for k in theta0
        }
        grads = torch.autograd.grad(loss_at(params), list(params.values()))
        for (k, s), grad in zip(expected.items(), grads, strict=True):
            d = torch.sigmoid(s) * (1 - torch.sigmoid(s))
            if regularizer == "paper":
                expected[k] = s - lr * grad * tau[k] * d - l1 * d
            else:
                expected[k] = s - lr * grad * tau[k] * d + l1 * torch.where(s > 0, d, -d)
    for k in expected:
        torch.testing.assert_close(learned[k], expected[k])
    for k, p in model.named_parameters():  # the model is left at θ0
        torch.testing.assert_close(p.detach(), theta0[k])


def test_learned_with_no_epochs_is_the_dataless_merge(open_clip_pool, tiny_datasets):
    data = TaskData(datasets=tiny_datasets)
    learned = LocalizeAndStitchLearned(sparsity=0.05, num_epochs=0).merge(
        open_clip_pool, data, Context()
    )
    from fusion_bench.method.base import pool_experts

    dataless = LocalizeAndStitch(sparsity=0.05).merge(
        open_clip_pool.pretrained(), pool_experts(open_clip_pool)
    )
    assert_state_dict_close(learned, dataless)


def test_learned_masks_change_the_merge(open_clip_pool, tiny_datasets):
    data = TaskData(datasets=tiny_datasets)
    method = LocalizeAndStitchLearned(
        sparsity=0.05, num_epochs=2, shots_per_class=2, max_samples=8, batch_size=4
    )
    learned = method.merge(open_clip_pool, data, Context())
    start = LocalizeAndStitchLearned(sparsity=0.05, num_epochs=0).merge(
        open_clip_pool, data, Context()
    )
    assert all(v.isfinite().all() for v in learned.values() if v.is_floating_point())
    assert any(not torch.equal(learned[k], start[k]) for k in learned)


def test_few_shot_sample(tiny_datasets):
    data = TaskData(datasets=tiny_datasets)
    sample = few_shot_sample(data, "mnist", shots=2, cap=100, seed=0)
    labels = sample["label"]
    assert len(labels) == 20 and all(labels.count(c) == 2 for c in range(10))  # 10 classes
    assert len(few_shot_sample(data, "mnist", shots=2, cap=7, seed=0)) == 7
    again = few_shot_sample(data, "mnist", shots=2, cap=100, seed=0)
    assert [r["image"].tobytes() for r in again] == [r["image"].tobytes() for r in sample]
    train = {r["image"].tobytes() for r in data.load_split("mnist", "train")}
    assert all(r["image"].tobytes() in train for r in sample)  # never the validation images


def test_learned_bad_options_name_the_option():
    for options, option in [
        ({"sparsity": 2.0}, "sparsity"),
        ({"num_epochs": -1}, "num_epochs"),
        ({"sigmoid_bias": 0.0}, "sigmoid_bias"),
        ({"regularizer": "l2"}, "regularizer"),
        ({"batch_size": 0}, "batch_size"),
    ]:
        with pytest.raises(FusionBenchError, match=option):
            LocalizeAndStitchLearned(**options)
