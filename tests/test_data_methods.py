"""Data-using merges (Fisher merging, RegMean, RegMean++) and their calibration data: closed-form
oracles on hand-made tensors, the hooks against hand-computed layer inputs, and one CLI run each
on the tiny pools."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusion_bench.method.base import Context
from fusion_bench.method.fisher_merging import FisherMerging, diagonal_fisher
from fusion_bench.method.regmean import GramRecorder, RegMean, reduce_off_diagonal
from fusion_bench.method.simple_average import SimpleAverage
from fusion_bench.taskpool.data import TaskData
from fusion_bench.testing import as_experts, assert_state_dict_close
from tests.conftest import TASKS
from tests.test_cli import run_cli


def toy_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "fc1.weight": torch.randn(5, 4, generator=g),  # (out, in)
        "fc1.bias": torch.randn(5, generator=g),
        "fc2.weight": torch.randn(3, 5, generator=g),
        "norm.weight": torch.randn(5, generator=g),
        "position_ids": torch.arange(4),
    }


# -- RegMean ------------------------------------------------------------------------------------
def test_regmean_with_identity_grams_is_the_simple_average():
    pre, experts = toy_state(0), [toy_state(1), toy_state(2), toy_state(3)]
    grams = [{"fc1.weight": torch.eye(4), "fc2.weight": torch.eye(5)} for _ in experts]
    average = SimpleAverage().merge(pre, as_experts(experts))
    for ratio in (0.0, 0.6, 1.0):
        merged = RegMean(reduce_non_diagonal_ratio=ratio).solve(pre, as_experts(experts), grams)
        assert_state_dict_close(merged, average)


def test_regmean_single_layer_is_the_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(30, 4, generator=g), torch.randn(30, 4, generator=g) * 3]  # (rows, in)
    ws = [torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)]  # (out, in)
    grams = [{"w": x.T @ x / len(x)} for x in xs]  # the recorder's mean over rows
    merged = RegMean(reduce_non_diagonal_ratio=1.0).solve(
        {"w": torch.zeros(3, 4)}, as_experts([{"w": w} for w in ws]), grams
    )["w"]
    # argmin_W Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖² (equal row counts, so the 1/rows factor is common)
    inputs, targets = torch.cat(xs), torch.cat([x @ w.T for x, w in zip(xs, ws, strict=True)])
    expected = torch.linalg.lstsq(inputs, targets).solution.T
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)


def test_regmean_ratio_zero_is_a_per_input_weighted_average():
    w1, w2 = torch.randn(3, 2), torch.randn(3, 2)
    grams = [
        {"w": torch.tensor([[1.0, 5.0], [5.0, 3.0]])},
        {"w": torch.tensor([[3.0, 7.0], [7.0, 1.0]])},
    ]
    merged = RegMean(reduce_non_diagonal_ratio=0.0).solve(
        {"w": torch.zeros(3, 2)}, as_experts([{"w": w1}, {"w": w2}]), grams
    )["w"]
    expected = torch.stack(
        [(1 * w1[:, 0] + 3 * w2[:, 0]) / 4, (3 * w1[:, 1] + 1 * w2[:, 1]) / 4], 1
    )
    torch.testing.assert_close(merged, expected)
    torch.testing.assert_close(
        reduce_off_diagonal(grams[0]["w"], 0.5), torch.tensor([[1.0, 2.5], [2.5, 3.0]])
    )


def test_gram_recorder_sees_the_true_layer_inputs():
    torch.manual_seed(0)
    block = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "fc": nn.Linear(8, 4)}).eval()
    x = torch.randn(5, 3, 8)  # (L, N, D), open_clip's layout
    with GramRecorder(block, "blk.") as rec, torch.no_grad():
        out = block["attn"](x, x, x, need_weights=False)[0]
        block["fc"](out)
    grams = rec.grams()
    assert set(grams) == {"blk.attn.in_proj_weight", "blk.attn.out_proj.weight", "blk.fc.weight"}
    # the attention output before out_proj, by hand
    attn = block["attn"]
    q, k, v = (x @ attn.in_proj_weight.T + attn.in_proj_bias).chunk(3, dim=-1)

    def heads(t):  # (L, N, D) -> (N·H, L, D/H)
        return t.reshape(5, 3 * 2, 4).transpose(0, 1)

    z = (torch.softmax(heads(q) @ heads(k).transpose(1, 2) / 2.0, -1) @ heads(v)).transpose(0, 1)
    z = z.reshape(-1, 8)
    rows = x.reshape(-1, 8)
    torch.testing.assert_close(grams["blk.attn.in_proj_weight"], rows.T @ rows / 15)
    torch.testing.assert_close(
        grams["blk.attn.out_proj.weight"], z.T @ z / 15, atol=1e-5, rtol=1e-5
    )
    flat = out.reshape(-1, 8)
    torch.testing.assert_close(grams["blk.fc.weight"], flat.T @ flat / 15)


def test_gram_recorder_covers_every_linear_layer_of_both_towers(open_clip_pool, hf_pool_files):
    from fusion_bench.modelpool.clip_vision import CLIPVisionModelPool

    hf_pool = CLIPVisionModelPool(hf_pool_files["pretrained"], hf_pool_files["experts"])
    expected = {
        open_clip_pool: (
            "attn.in_proj_weight",
            "attn.out_proj.weight",
            "mlp.c_fc.weight",
            "mlp.c_proj.weight",
        ),
        hf_pool: (
            "q_proj.weight",
            "k_proj.weight",
            "v_proj.weight",
            "out_proj.weight",
            "fc1.weight",
            "fc2.weight",
        ),
    }
    for pool, suffixes in expected.items():
        encoder = pool.build_encoder()
        classifier = pool.classifier(encoder)
        with GramRecorder(encoder) as rec, torch.no_grad():
            classifier.features(encoder, torch.randn(2, 3, 16, 16))
        assert len(rec.sums) == 2 * len(suffixes)  # two blocks
        assert all(k.endswith(suffixes) and k in encoder.state_dict() for k in rec.sums)


# -- Fisher merging -----------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [True, False])
def test_fisher_with_equal_fishers_is_the_simple_average(normalize):
    pre, experts = toy_state(0), [toy_state(1), toy_state(2), toy_state(3)]
    fisher = {k: v.abs() for k, v in toy_state(4).items() if v.is_floating_point()}
    merged = FisherMerging(normalize_fisher_weight=normalize).fisher_average(
        pre, as_experts(experts), [fisher] * 3
    )
    assert_state_dict_close(merged, SimpleAverage().merge(pre, as_experts(experts)))


@pytest.mark.parametrize("normalize", [True, False])
def test_fisher_merging_closed_form_two_experts(normalize):
    eps = 1e-6
    t1, t2 = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([5.0, -2.0, 0.0])
    f1, f2 = torch.tensor([1.0, 0.0, 3.0]), torch.tensor([1.0, 2.0, 1.0])
    method = FisherMerging(normalize_fisher_weight=normalize, minimal_fisher_weight=eps)
    merged = method.fisher_average(
        {"w": torch.zeros(3)}, as_experts([{"w": t1}, {"w": t2}]), [{"w": f1}, {"w": f2}]
    )["w"]
    c1, c2 = (1 / (10**0.5 + eps), 1 / (6**0.5 + eps)) if normalize else (1.0, 1.0)
    w1, w2 = c1 * (f1 + eps), c2 * (f2 + eps)
    torch.testing.assert_close(merged, (w1 * t1 + w2 * t2) / (w1 + w2))
    if not normalize:  # by hand: entry 0 averages, entry 1 takes expert 2, entry 2 is 3:1
        torch.testing.assert_close(merged, torch.tensor([3.0, -2.0, 2.25]), atol=1e-5, rtol=0)


def test_diagonal_fisher_matches_the_closed_form_for_a_linear_softmax():
    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=False)
    batches = [torch.randn(2, 4), torch.randn(3, 4)]
    fisher = diagonal_fisher(model, model, batches)
    expected = torch.zeros(3, 4)
    with torch.no_grad():
        for x in batches:
            p = torch.softmax(model(x), dim=-1)  # (B, C)
            # ∇_W Σ_b Σ_c sqrt(p_bc) log p_bc = Σ_b (sqrt(p_b) − (Σ_c sqrt(p_bc)) p_b) x_bᵀ
            coeff = p.sqrt() - p.sqrt().sum(-1, keepdim=True) * p
            expected += (coeff.T @ x) ** 2
    torch.testing.assert_close(fisher["weight"], expected / 5)


# -- calibration data ---------------------------------------------------------------------------
def test_calibration_uses_train_minus_the_carved_validation(open_clip_pool, tiny_datasets):
    from fusion_bench.taskpool.clip_classification import CLIPClassificationTaskPool

    data = TaskData(datasets=tiny_datasets)
    preprocess = open_clip_pool.classifier(open_clip_pool.build_encoder()).preprocess
    batches = list(data.images("mnist", "train", preprocess, num_samples=100, batch_size=8))
    assert [len(b) for b in batches] == [8, 8, 8, 8, 4]  # 40 train − 4 carved for validation
    assert batches[0].shape[1:] == (3, 16, 16)
    pool = CLIPClassificationTaskPool(list(TASKS), datasets=tiny_datasets)
    train = {tuple(r["image"].tobytes()) for r in pool.data.load_split("mnist", "train")}
    val = {tuple(r["image"].tobytes()) for r in pool.data.load_split("mnist", "validation")}
    assert len(train) == 36 and len(val) == 4 and not train & val
    few = data.images("eurosat", "train", preprocess, num_samples=10, batch_size=4)
    assert sum(len(b) for b in few) == 10


# -- whole methods on the tiny pools ------------------------------------------------------------
def test_regmean_and_regmean_plusplus_of_one_expert_return_it(open_clip_files_one):
    from fusion_bench.method.regmean import RegMean

    pool, datasets = open_clip_files_one
    expert = pool.expert("mnist")
    for method in (
        RegMean(num_regmean_examples=16),
        RegMean(num_regmean_examples=16, blockwise=True),
    ):
        merged = method.merge(pool, TaskData(datasets=datasets), Context())
        assert_state_dict_close(merged, {k: expert[k] for k in expert}, atol=1e-4, rtol=1e-4)


@pytest.fixture
def open_clip_files_one(open_clip_pool_files, tiny_datasets):
    from fusion_bench.modelpool.open_clip import OpenCLIPModelPool

    f = open_clip_pool_files
    pool = OpenCLIPModelPool(
        f["model_name"], f["pretrained"], {"mnist": f["experts"]["mnist"]}, model_config=f["config"]
    )
    return pool, {"mnist": tiny_datasets["mnist"]}


@pytest.mark.parametrize(
    ("method", "family", "extra"),
    [
        ("fisher_merging", "hf", ["method.num_fisher_examples=16", "method.batch_size=8"]),
        ("regmean", "open_clip", ["method.num_regmean_examples=16"]),
        ("regmean_plusplus", "hf", ["method.num_regmean_examples=16"]),
    ],
)
def test_cli_runs(method, family, extra, open_clip_cli_args, hf_cli_args, tmp_path, capsys):
    args = open_clip_cli_args if family == "open_clip" else hf_cli_args
    code, out, err = run_cli(
        [*args, f"method={method}", *extra, "logger=none", f"hydra.run.dir={tmp_path}"], capsys
    )
    assert code == 0, err
    assert f"== {method} ==" in out and "average" in out


def test_regmean_plusplus_equals_regmean_when_experts_differ_only_in_the_last_block(
    open_clip_pool, tiny_datasets, tmp_path
):
    """Then every expert's last block sees the same inputs in its own model as in the merged one,
    so the two methods solve the same systems (an oracle for the layer-by-layer plumbing)."""
    from safetensors.torch import save_file

    from fusion_bench.method.regmean import RegMean
    from fusion_bench.modelpool.open_clip import OpenCLIPModelPool

    pre = open_clip_pool.pretrained()
    files = {}
    for task in TASKS:
        expert = open_clip_pool.expert(task)
        state = {
            k: (expert[k] if k.startswith("transformer.resblocks.1.") else pre[k]).contiguous()
            for k in expert
        }
        save_file(state, tmp_path / f"{task}.safetensors")
        files[task] = str(tmp_path / f"{task}.safetensors")
    pool = OpenCLIPModelPool(
        open_clip_pool.model_name,
        open_clip_pool.pretrained_location,
        files,
        model_config=open_clip_pool.model_config,
    )
    kwargs = {"num_regmean_examples": 8, "batch_size": 8, "reduce_non_diagonal_ratio": 0.9}
    data, context = TaskData(datasets=tiny_datasets), Context()
    plain = RegMean(**kwargs).merge(pool, data, context)
    plusplus = RegMean(blockwise=True, **kwargs).merge(pool, data, context)
    assert_state_dict_close(plusplus, plain, atol=1e-4, rtol=1e-4)
    key = "transformer.resblocks.1.mlp.c_fc.weight"  # and it is not just the average
    average = SimpleAverage().merge(pre, {t: pool.expert(t) for t in TASKS})
    assert not torch.allclose(plain[key], average[key])
    # not vacuous: when block 0 differs too, block 1 sees other inputs in RegMean++
    plain, plusplus = (
        RegMean(**kwargs).merge(open_clip_pool, data, context),
        RegMean(blockwise=True, **kwargs).merge(open_clip_pool, data, context),
    )
    torch.testing.assert_close(
        plusplus["transformer.resblocks.0.mlp.c_fc.weight"],
        plain["transformer.resblocks.0.mlp.c_fc.weight"],
        atol=0.5,
        rtol=0,
    )
    assert not torch.allclose(plusplus[key], plain[key], atol=1e-4)
