"""LiNeS (fusion_bench/method/lines.py) against a dense float64 re-statement of the paper's rule,
θ = θ0 + λ(l) τ with λ(l) = α + β l/(L − 1), and its closed-form special cases."""

from __future__ import annotations

import pytest
import torch

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.lines import LiNeS, block_depths
from fusion_bench.method.task_arithmetic import TaskArithmetic
from fusion_bench.method.ties_merging import TiesMerging
from fusion_bench.testing import as_experts, assert_state_dict_close
from tests.test_cli import run_cli

D, L = 6, 12  # 12 blocks: indices 10 and 11 must not be read as block 1


def hf_tower(seed: int, scale: float = 1.0, prefix: str = "") -> tuple[dict, dict]:
    """A Hugging Face CLIP image tower in miniature and each key's block (None: outside)."""
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[tuple[int, ...], int | None]] = {
        "embeddings.class_embedding": ((D,), None),
        "embeddings.patch_embedding.weight": ((D, 3, 2, 2), None),
        "embeddings.position_embedding.weight": ((5, D), None),
        "pre_layrnorm.weight": ((D,), None),
        "post_layernorm.bias": ((D,), None),
    }
    for i in range(L):
        shapes[f"encoder.layers.{i}.self_attn.q_proj.weight"] = ((D, D), i)
        shapes[f"encoder.layers.{i}.mlp.fc1.bias"] = ((2 * D,), i)
    state = {prefix + k: scale * torch.randn(s, generator=g) for k, (s, _) in shapes.items()}
    state[prefix + "embeddings.position_ids"] = torch.arange(5)  # integer buffer: kept at θ0
    return state, {prefix + k: block for k, (_, block) in shapes.items()}


def open_clip_tower(seed: int, scale: float = 1.0) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[tuple[int, ...], int | None]] = {
        "class_embedding": ((D,), None),
        "conv1.weight": ((D, 3, 2, 2), None),
        "positional_embedding": ((5, D), None),
        "ln_pre.weight": ((D,), None),
        "ln_post.weight": ((D,), None),
        "proj": ((D, 4), None),
    }
    for i in range(3):
        shapes[f"transformer.resblocks.{i}.attn.in_proj_weight"] = ((3 * D, D), i)
        shapes[f"transformer.resblocks.{i}.mlp.c_fc.weight"] = ((2 * D, D), i)
    state = {k: scale * torch.randn(s, generator=g) for k, (s, _) in shapes.items()}
    return state, {k: block for k, (_, block) in shapes.items()}


def pool(tower=hf_tower, n: int = 3, **kwargs):
    pre, blocks = tower(0, **kwargs)
    experts = []
    for i in range(1, n + 1):
        tau, _ = tower(i, 0.05, **kwargs)
        experts.append({k: pre[k] + tau[k] if pre[k].is_floating_point() else pre[k] for k in pre})
    return pre, experts, blocks


def dense_lines(pre, merged_tau, blocks, alpha, beta):
    """The paper's rule in float64, the λ of each key from its known block."""
    n_blocks = max(b for b in blocks.values() if b is not None) + 1
    out = {}
    for key, theta0 in pre.items():
        if not theta0.is_floating_point():
            out[key] = theta0
            continue
        block = blocks[key]
        lam = alpha if block is None else alpha + beta * block / (n_blocks - 1)
        out[key] = (theta0.double() + lam * merged_tau[key].double()).float()
    return out


def task_sum(pre, experts):
    return {
        k: sum(e[k].double() - pre[k].double() for e in experts)
        for k in pre
        if pre[k].is_floating_point()
    }


@pytest.mark.parametrize("alpha", [0.125, 0.4])
def test_beta_zero_is_task_arithmetic_with_alpha(alpha):
    pre, experts, _ = pool()
    out = LiNeS(alpha=alpha, beta=0.0).merge(pre, as_experts(experts))
    expected = TaskArithmetic(scaling_factor=alpha).merge(pre, as_experts(experts))
    assert_state_dict_close(out, expected, atol=1e-6, rtol=0)
    assert torch.equal(out["embeddings.position_ids"], pre["embeddings.position_ids"])


@pytest.mark.parametrize("tower", [hf_tower, open_clip_tower])
@pytest.mark.parametrize("alpha,beta", [(0.1, 0.5), (0.3, 1.2)])
def test_task_arithmetic_base_equals_the_dense_rule(tower, alpha, beta):
    pre, experts, blocks = pool(tower)
    out = LiNeS(alpha=alpha, beta=beta).merge(pre, as_experts(experts))
    expected = dense_lines(pre, task_sum(pre, experts), blocks, alpha, beta)
    assert_state_dict_close(out, expected, atol=1e-6, rtol=0)


def test_first_block_gets_alpha_last_alpha_plus_beta_outside_alpha():
    pre, experts, _ = pool(n=1)
    alpha, beta = 0.2, 0.7
    out = LiNeS(alpha=alpha, beta=beta).merge(pre, as_experts(experts))

    def scale(key):  # the ratio of the merged update to the single task vector
        tau = experts[0][key] - pre[key]
        return float((out[key] - pre[key]).double().norm() / tau.double().norm())

    assert scale("encoder.layers.0.self_attn.q_proj.weight") == pytest.approx(alpha, rel=1e-5)
    assert scale("encoder.layers.11.self_attn.q_proj.weight") == pytest.approx(
        alpha + beta, rel=1e-5
    )
    assert scale("encoder.layers.1.mlp.fc1.bias") == pytest.approx(alpha + beta / 11, rel=1e-5)
    assert scale("encoder.layers.10.mlp.fc1.bias") == pytest.approx(
        alpha + 10 * beta / 11, rel=1e-5
    )
    for key in ("embeddings.class_embedding", "pre_layrnorm.weight", "post_layernorm.bias"):
        assert scale(key) == pytest.approx(alpha, rel=1e-5)


def test_default_alpha_after_task_arithmetic_is_one_over_t():
    pre, experts, blocks = pool(n=4)
    out = LiNeS(beta=0.6).merge(pre, as_experts(experts))  # alpha: the authors' norm rule
    expected = dense_lines(pre, task_sum(pre, experts), blocks, 1 / 4, 0.6)
    assert_state_dict_close(out, expected, atol=1e-6, rtol=0)


def test_ties_base_runs_at_scale_one_with_the_norm_ratio_alpha():
    pre, experts, blocks = pool(n=3)
    method = LiNeS(beta=0.5, base="ties_merging", base_options={"merge_func": "mean"})
    assert method.base_method() == TiesMerging(scaling_factor=1.0, merge_func="mean")
    ties = TiesMerging(scaling_factor=1.0, threshold=20, merge_func="mean").merge(
        pre, as_experts(experts)
    )
    merged_tau = {k: ties[k].double() - pre[k].double() for k in task_sum(pre, experts)}
    summed = sum(t.abs().sum() for t in task_sum(pre, experts).values())
    alpha = float(summed / sum(t.abs().sum() for t in merged_tau.values())) / 3
    assert alpha > 1 / 3  # TIES's merged vector is smaller than the sum
    out = method.merge(pre, as_experts(experts))
    assert_state_dict_close(out, dense_lines(pre, merged_tau, blocks, alpha, 0.5), atol=1e-6)


def test_transformers4_prefix_and_block_depths():
    pre, experts, blocks = pool(prefix="vision_model.")
    depths = block_depths(pre)
    assert depths["vision_model.encoder.layers.11.mlp.fc1.bias"] == (11, 12)
    assert depths["vision_model.encoder.layers.1.mlp.fc1.bias"] == (1, 12)
    assert "vision_model.pre_layrnorm.weight" not in depths
    out = LiNeS(alpha=0.1, beta=0.9).merge(pre, as_experts(experts))
    expected = dense_lines(pre, task_sum(pre, experts), blocks, 0.1, 0.9)
    assert_state_dict_close(out, expected, atol=1e-6, rtol=0)


def test_excluded_keys_stay_at_theta0_and_leave_the_norms():
    pre, experts, blocks = pool()
    excluded = "encoder.layers.3.*"
    out = LiNeS(beta=0.4, base_options={"exclude_keys": [excluded]}).merge(pre, as_experts(experts))
    tau = task_sum(pre, experts)
    for key in tau:
        if key.startswith("encoder.layers.3."):
            assert torch.equal(out[key], pre[key])
            tau[key] = torch.zeros_like(tau[key])
    assert_state_dict_close(out, dense_lines(pre, tau, blocks, 1 / 3, 0.4), atol=1e-6, rtol=0)


def test_one_block_gets_alpha_and_no_block_is_an_error():
    pre = {"transformer.resblocks.0.w": torch.zeros(3), "ln.w": torch.zeros(3)}
    expert = {"transformer.resblocks.0.w": torch.ones(3), "ln.w": torch.ones(3)}
    out = LiNeS(alpha=0.5, beta=1.0).merge(pre, as_experts([expert]))
    torch.testing.assert_close(out["transformer.resblocks.0.w"], torch.full((3,), 0.5))
    with pytest.raises(FusionBenchError, match="no state-dict key names a block"):
        LiNeS(alpha=0.5).merge({"w": torch.zeros(2)}, as_experts([{"w": torch.ones(2)}]))


def test_bad_options_are_clear_errors():
    with pytest.raises(FusionBenchError, match="method.alpha"):
        LiNeS(alpha=-0.1)
    with pytest.raises(FusionBenchError, match="method.beta"):
        LiNeS(beta=-1.0)
    with pytest.raises(FusionBenchError, match="base_options.scaling_factor"):
        LiNeS(base_options={"scaling_factor": 0.3})
    with pytest.raises(FusionBenchError, match="method.base='nope'"):
        LiNeS(base="nope")
    with pytest.raises(FusionBenchError, match="data-free merge"):
        LiNeS(base="regmean")
    with pytest.raises(FusionBenchError, match="merge_func"):
        LiNeS(base="ties_merging", base_options={"merge_func": "avg"})


def test_runs_from_the_cli_after_ties(open_clip_cli_args, tmp_path, capsys):
    code, out, err = run_cli(
        [
            *open_clip_cli_args,
            "method=lines",
            "method.base=ties_merging",
            "++method.base_options.merge_func=mean",
            "logger=none",
            "fast_dev_run=true",
            f"hydra.run.dir={tmp_path}",
        ],
        capsys,
    )
    assert code == 0, err[-3000:]
    assert "== lines ==" in out
