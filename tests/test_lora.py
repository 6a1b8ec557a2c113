"""LoRA experts (PEFT adapters) and the LoRA merges: Core Space and KnOTS.

Oracles: the pool's expanded expert equals PEFT's own ``merge_and_unload`` (Linear modules,
rsLoRA and per-module alpha; PEFT's MultiheadAttention layer is refused); the Core Space projection is lossless
(float64, realistic and non-square shapes, ill-conditioned factors); Core Space and KnOTS with
task arithmetic inside equal task arithmetic on the expanded experts; N identical adapters give
that adapter; bad adapters fail naming the problem.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import fusion_bench
from fusion_bench.errors import FusionBenchError
from fusion_bench.lora import LowRank
from fusion_bench.method.lora.core_space import CoreSpace, core_space
from fusion_bench.method.lora.knots import KnOTS, knots_align
from fusion_bench.modelpool.lora import LoRAModelPool
from tests.conftest import TASKS, base_pool, write_adapter
from tests.test_cli import run_cli


def expanded(pool) -> dict:
    return {n: {k: pool.expert(n)[k] for k in pool.pretrained()} for n in pool.expert_names}


# -- the pool ----------------------------------------------------------------------------------
def test_expanded_expert_equals_peft_merge_and_unload(lora_pool, lora_pool_files):
    adapter = lora_pool.adapter(TASKS[0])
    assert {k.rsplit(".", 2)[-2] for k in adapter} == {"c_fc", "c_proj"}
    for task in TASKS:
        expert = lora_pool.expert(task)
        truth = lora_pool_files["truth"][task]
        assert set(expert) == set(truth)
        for key in truth:
            torch.testing.assert_close(expert[key], truth[key], rtol=1e-5, atol=1e-6)
        changed = [k for k in truth if not torch.equal(truth[k], lora_pool.pretrained()[k])]
        assert set(changed) == set(lora_pool.adapter(task))


def test_rslora_and_alpha_pattern_scalings(open_clip_pool_files, tmp_path):
    base = base_pool(open_clip_pool_files)
    truth = write_adapter(
        base, tmp_path / "a", seed=3, use_rslora=True, alpha_pattern={"c_fc": 3.0}, r=4
    )
    pool = LoRAModelPool(base=base, adapters={"a": str(tmp_path / "a")})
    for key in truth:
        torch.testing.assert_close(pool.expert("a")[key], truth[key], rtol=1e-5, atol=1e-6)


def test_every_method_runs_on_expanded_lora_experts(lora_pool):
    merged = fusion_bench.merge("task_arithmetic", lora_pool, scaling_factor=0.5)
    pre = lora_pool.pretrained()
    for key in pre:
        want = pre[key] + 0.5 * sum(lora_pool.expert(t)[key] - pre[key] for t in TASKS)
        torch.testing.assert_close(merged[key], want, rtol=1e-5, atol=1e-6)


# -- Core Space ----------------------------------------------------------------------------------
def random_pairs(m: int, n: int, r: int, t: int, seed: int, condition: float = 1.0):
    """T float64 LoRA pairs; ``condition``: the ratio of the largest to the smallest singular value
    of every factor (ill-conditioned layers broke an eigen-solver shortcut before)."""
    g = torch.Generator().manual_seed(seed)

    def factor(rows: int, cols: int) -> torch.Tensor:
        q1, _ = torch.linalg.qr(
            torch.randn(rows, min(rows, cols), generator=g, dtype=torch.float64)
        )
        q2, _ = torch.linalg.qr(
            torch.randn(cols, min(rows, cols), generator=g, dtype=torch.float64)
        )
        s = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), min(rows, cols))
        return q1 @ torch.diag(s.to(torch.float64)) @ q2.T

    return [LowRank(B=factor(m, r), A=factor(r, n)) for _ in range(t)]


@pytest.mark.parametrize(
    ("m", "n", "r", "t", "condition"),
    [(768, 768, 16, 8, 1.0), (3072, 768, 16, 8, 1e6), (768, 3072, 8, 3, 1e8), (20, 30, 4, 8, 1.0)],
)
def test_core_space_projection_is_lossless(m, n, r, t, condition):
    pairs = random_pairs(m, n, r, t, seed=m + n + t, condition=condition)
    U, V, cores = core_space(pairs)
    assert U.shape == (m, min(m, t * r)) and V.shape == (min(n, t * r), n)
    torch.testing.assert_close(U.T @ U, torch.eye(U.shape[1], dtype=torch.float64))
    torch.testing.assert_close(V @ V.T, torch.eye(V.shape[0], dtype=torch.float64))
    for p, core in zip(pairs, cores, strict=True):
        full = p.B @ p.A
        err = (U @ core @ V - full).norm() / full.norm()
        assert err < 1e-10


def toy(m=48, n=40, r=4, t=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = {"w": torch.randn(m, n, generator=g), "b": torch.randn(m, generator=g)}
    adapters = {
        f"t{i}": {
            "w": LowRank(B=torch.randn(m, r, generator=g), A=torch.randn(r, n, generator=g) * 0.1)
        }
        for i in range(t)
    }
    experts = {
        name: {"w": pre["w"] + a["w"].full(), "b": pre["b"].clone()} for name, a in adapters.items()
    }
    return pre, adapters, experts


@pytest.mark.parametrize("method", [CoreSpace, KnOTS])
def test_task_arithmetic_inside_equals_full_space_task_arithmetic(method):
    pre, adapters, experts = toy()
    options = {"scaling_factor": 0.4}
    merged = method(base="task_arithmetic", base_options=options).merge(pre, adapters)
    full = fusion_bench.merge("task_arithmetic", pre, experts, **options)
    for key in pre:
        torch.testing.assert_close(merged[key], full[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("method", "base", "options", "copies"),
    [
        (
            CoreSpace,
            "ties_merging",
            {"scaling_factor": 1.0, "threshold": 100, "merge_func": "mean"},
            4,
        ),
        (KnOTS, "ties_merging", {"scaling_factor": 1.0, "threshold": 100, "merge_func": "mean"}, 4),
        (CoreSpace, "tsv_m", {"scaling_factor": 1.0}, 1),  # one task keeps all its r triplets
    ],
)
def test_identical_adapters_give_that_adapter(method, base, options, copies):
    pre, adapters, _ = toy(t=1)
    same = {f"copy{i}": adapters["t0"] for i in range(copies)}
    merged = method(base=base, base_options=options).merge(pre, same)
    want = pre["w"] + adapters["t0"]["w"].full()
    torch.testing.assert_close(merged["w"], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged["b"], pre["b"])


def test_iso_c_in_core_space_flattens_the_core_spectrum():
    pre, adapters, _ = toy(m=64, n=56, r=3, t=4)
    merged = CoreSpace(base="iso_c", base_options={"scaling_factor": 1.0}).merge(pre, adapters)
    delta = (merged["w"] - pre["w"]).double()
    s = torch.linalg.svdvals(delta)
    total = sum(a["w"].full() for a in adapters.values()).double()
    core_rank = 12  # T·r: the core's singular values, all equal to their mean
    torch.testing.assert_close(
        s[:core_rank], s[:core_rank].mean().expand(core_rank), rtol=1e-4, atol=1e-4
    )
    assert s[core_rank:].max() < 1e-4 * s[0]
    # their mean is the mean of the core sum's singular values (some may be ~0 in ΔW's span)
    assert s[0].item() == pytest.approx(
        torch.linalg.svdvals(total)[:core_rank].mean().item(), rel=1e-4
    )


@pytest.mark.parametrize(("m", "n", "condition"), [(96, 80, 1.0), (768, 3072, 1e6)])
def test_knots_alignment_matches_a_dense_svd_of_the_concatenation(m, n, condition):
    pairs = random_pairs(m, n, 4, 3, seed=5, condition=condition)
    U, reps = knots_align(pairs, 0.0)  # every direction: an exact check
    dense = torch.cat([p.B @ p.A for p in pairs], dim=1)
    s = torch.linalg.svdvals(dense)
    stacked = torch.cat(reps, dim=1)  # diag(S) [V_1 … V_T]
    torch.testing.assert_close(
        torch.linalg.svdvals(stacked), s[: U.shape[1]], rtol=1e-9, atol=1e-12
    )
    for p, rep in zip(pairs, reps, strict=True):
        full = p.B @ p.A
        assert (U @ rep - full).norm() / full.norm() < 1e-9


def test_knots_ties_trims_over_all_weights_at_once():
    """One global top-k over every weight's representations (the authors flatten the model):
    a weight whose representations are tiny next to another's is trimmed away entirely."""
    g = torch.Generator().manual_seed(0)
    pre = {"big": torch.zeros(16, 12), "small": torch.zeros(16, 12)}
    adapters = {
        f"t{i}": {
            "big": LowRank(torch.randn(16, 2, generator=g), torch.randn(2, 12, generator=g)),
            "small": LowRank(
                1e-3 * torch.randn(16, 2, generator=g), torch.randn(2, 12, generator=g)
            ),
        }
        for i in range(2)
    }
    options = {"scaling_factor": 1.0, "threshold": 20, "merge_func": "mean"}
    merged = KnOTS(base_options=options).merge(pre, adapters)
    assert merged["big"].abs().sum() > 0 and merged["small"].abs().sum() == 0


# -- the run, as a user runs it -----------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora/core_space_ties", "lora/knots", "ties_merging"])
def test_cli_runs_lora_methods_and_full_space_methods(lora_cli_args, method, tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = run_cli(
        [*lora_cli_args, f"method={method}", "logger=none", f"hydra.run.dir={run}"], capsys
    )
    assert code == 0, err[-3000:]
    report = json.loads((run / "report.json").read_text())
    assert report["modelpool"]["family"] == "lora"
    assert set(report["modelpool"]["adapters"]) == set(TASKS)
    assert 0.0 <= report["metrics"]["test/avg_acc"] <= 1.0


def test_python_api_core_space_task_arithmetic_equals_task_arithmetic(lora_pool):
    merged = fusion_bench.merge("lora/core_space", lora_pool, base_options={"scaling_factor": 0.3})
    full = fusion_bench.merge("task_arithmetic", lora_pool, scaling_factor=0.3)
    for key in full:
        torch.testing.assert_close(merged[key], full[key], rtol=1e-5, atol=1e-5)


# -- bad input ----------------------------------------------------------------------------------
def test_lora_method_on_a_full_pool_names_the_fix(open_clip_pool):
    with pytest.raises(FusionBenchError, match="LoRA pool: modelpool=tiny8_lora"):
        fusion_bench.merge("lora/core_space", open_clip_pool)


def test_bad_adapters_fail_clearly(open_clip_pool_files, lora_pool_files, tmp_path):
    base = base_pool(open_clip_pool_files)
    good = lora_pool_files["adapters"][TASKS[0]]

    def pool_with(directory) -> LoRAModelPool:
        return LoRAModelPool(base=base, adapters={"x": str(directory)})

    with pytest.raises(FusionBenchError, match="neither an existing directory nor a Hugging Face"):
        pool_with(tmp_path / "missing").adapter("x")
    (tmp_path / "file.safetensors").write_bytes(b"")
    with pytest.raises(FusionBenchError, match="not a directory"):
        pool_with(tmp_path / "file.safetensors").adapter("x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FusionBenchError, match="no adapter_config.json"):
        pool_with(tmp_path / "empty").adapter("x")

    def variant(name: str, edit) -> str:
        target = tmp_path / name
        shutil.copytree(good, target)
        config = json.loads((target / "adapter_config.json").read_text())
        edit(config, target)
        (target / "adapter_config.json").write_text(json.dumps(config))
        return target

    dora = variant("dora", lambda c, _: c.update(use_dora=True))
    with pytest.raises(FusionBenchError, match="use_dora"):
        pool_with(dora).adapter("x")
    rank = variant("rank", lambda c, _: c.update(r=7))
    with pytest.raises(FusionBenchError, match="rank 4 in adapter_model.safetensors but rank 7"):
        pool_with(rank).adapter("x")
    weights = variant("weights", lambda c, t: (t / "adapter_model.safetensors").unlink())
    with pytest.raises(FusionBenchError, match="weights are missing"):
        pool_with(weights).adapter("x")
    corrupt = variant("corrupt", lambda c, t: (t / "adapter_model.safetensors").write_bytes(b"xx"))
    with pytest.raises(FusionBenchError, match="corrupt"):
        pool_with(corrupt).adapter("x")
    with pytest.raises(FusionBenchError, match="no expert 'y'"):
        pool_with(good).adapter("y")


def test_adapter_of_another_width_or_the_text_tower_is_refused(tmp_path, open_clip_pool_files):
    from safetensors.torch import save_file

    base = base_pool(open_clip_pool_files)
    directory = tmp_path / "wide"
    write_adapter(base, directory, seed=0)
    wide = {
        "base_model.model.transformer.resblocks.0.mlp.c_fc.lora_A.weight": torch.zeros(4, 64),
        "base_model.model.transformer.resblocks.0.mlp.c_fc.lora_B.weight": torch.zeros(128, 4),
    }
    save_file(wide, directory / "adapter_model.safetensors")
    with pytest.raises(FusionBenchError, match="trained on another base model"):
        LoRAModelPool(base=base, adapters={"x": str(directory)}).adapter("x")
    text = {
        "base_model.model.transformer.resblocks.0.mlp.c_fc.lora_A.weight": torch.zeros(4, 32),
        "base_model.model.transformer.resblocks.0.mlp.c_fc.lora_B.weight": torch.zeros(128, 4),
        "base_model.model.visual.transformer.resblocks.0.mlp.c_fc.lora_A.weight": torch.zeros(
            4, 32
        ),
        "base_model.model.visual.transformer.resblocks.0.mlp.c_fc.lora_B.weight": torch.zeros(
            128, 4
        ),
    }
    save_file(text, directory / "adapter_model.safetensors")
    with pytest.raises(FusionBenchError, match="text tower"):
        LoRAModelPool(base=base, adapters={"x": str(directory)}).adapter("x")


def test_multihead_attention_adapters_are_refused(open_clip_pool_files, tmp_path):
    """PEFT's nn.MultiheadAttention LoRA layer adds its out_proj update twice (peft <= 0.21.2):
    such an adapter is not W0 + s·BA, so the pool refuses it rather than merge another model."""
    base = base_pool(open_clip_pool_files)
    write_adapter(base, tmp_path / "mha", seed=0, target_modules=["attn"])
    with pytest.raises(FusionBenchError, match="MultiheadAttention"):
        LoRAModelPool(base=base, adapters={"x": str(tmp_path / "mha")}).adapter("x")


def test_hub_adapter_offline_names_the_fix(open_clip_pool_files):
    pool = LoRAModelPool(base=base_pool(open_clip_pool_files), adapters={"x": "nobody/no-adapter"})
    with pytest.raises(FusionBenchError, match="HF_HUB_OFFLINE"):
        pool.adapter("x")


def test_base_pool_with_its_own_experts_is_refused(open_clip_pool, lora_pool_files):
    with pytest.raises(FusionBenchError, match="finetuned=\\{\\}"):
        LoRAModelPool(base=open_clip_pool, adapters=lora_pool_files["adapters"])


# -- review findings (issue 14) -----------------------------------------------------------------
def test_patterns_match_peft_module_names_with_a_whole_clip_prefix(open_clip_pool_files, tmp_path):
    """PEFT matches alpha_pattern on the module's name in the model it wrapped: for an adapter
    trained on a whole CLIP, with the ``visual.`` prefix the pool then drops."""
    import open_clip
    import peft

    base = base_pool(open_clip_pool_files)
    model = open_clip.create_model(open_clip_pool_files["model_name"], pretrained=None)
    model.visual.load_state_dict(base.build_encoder().state_dict())
    torch.manual_seed(1)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=r"visual\..*\.(c_fc|c_proj)",
        alpha_pattern={r"visual\.transformer\.resblocks\.0\.mlp\.c_fc": 40.0},
        init_lora_weights=False,
    )
    wrapped = peft.get_peft_model(model, config)
    wrapped.save_pretrained(str(tmp_path / "whole"))
    truth = wrapped.merge_and_unload().visual.state_dict()
    pool = LoRAModelPool(base=base, adapters={"x": str(tmp_path / "whole")})
    for key in truth:
        torch.testing.assert_close(pool.expert("x")[key], truth[key], rtol=1e-5, atol=1e-6)


def test_mixed_ranks_missing_keys_and_small_matrices_keep_task_arithmetic_exact():
    """Ranks 8, 3, 5, 2; one expert without one weight; m, n smaller than R = 18."""
    g = torch.Generator().manual_seed(3)
    pre = {"a": torch.randn(12, 10, generator=g), "b": torch.randn(9, 16, generator=g)}
    adapters = {}
    for i, r in enumerate((8, 3, 5, 2)):
        keys = ("a", "b") if i != 1 else ("a",)
        adapters[f"t{i}"] = {
            k: LowRank(
                torch.randn(pre[k].shape[0], r, generator=g),
                torch.randn(r, pre[k].shape[1], generator=g),
            )
            for k in keys
        }
    experts = {
        n: {k: pre[k] + a[k].full() if k in a else pre[k] for k in pre} for n, a in adapters.items()
    }
    full = fusion_bench.merge("task_arithmetic", pre, experts, scaling_factor=0.3)
    for method in (CoreSpace(), KnOTS(base="task_arithmetic", base_options={})):
        merged = method.merge(pre, adapters)
        for key in pre:
            torch.testing.assert_close(merged[key], full[key], rtol=1e-5, atol=1e-5)


def pool_of_edited_copy(lora_pool_files, open_clip_pool_files, target, **config_changes):
    """A LoRA pool of one expert: a copy of a test adapter with its adapter_config.json edited."""
    shutil.copytree(lora_pool_files["adapters"][TASKS[0]], target)
    config = json.loads((target / "adapter_config.json").read_text())
    (target / "adapter_config.json").write_text(json.dumps({**config, **config_changes}))
    return LoRAModelPool(base=base_pool(open_clip_pool_files), adapters={"x": str(target)})


def test_initialisations_that_rewrite_the_base_are_refused(
    lora_pool_files, open_clip_pool_files, tmp_path
):
    pool = pool_of_edited_copy(
        lora_pool_files, open_clip_pool_files, tmp_path / "pissa", init_lora_weights="pissa_niter_4"
    )
    with pytest.raises(FusionBenchError, match="rewrites the base weights"):
        pool.adapter("x")


def test_an_adapter_naming_another_base_model_warns(
    lora_pool_files, open_clip_pool_files, tmp_path
):
    pool = pool_of_edited_copy(
        lora_pool_files,
        open_clip_pool_files,
        tmp_path / "other",
        base_model_name_or_path="openai/clip-vit-base-patch16",
    )
    with pytest.warns(UserWarning, match="clip-vit-base-patch16"):
        pool.adapter("x")


def test_core_space_scope_model_for_depth_scaled_rules():
    """LiNeS scales by depth across weights: refused per weight, and with scope=model it equals
    full-space LiNeS at a given α (L1 norm ratios, α = null, are not rotation invariant)."""
    g = torch.Generator().manual_seed(4)
    pre = {
        f"transformer.resblocks.{i}.mlp.c_fc.weight": torch.randn(16, 12, generator=g)
        for i in range(3)
    }
    adapters = {
        f"t{t}": {
            k: LowRank(torch.randn(16, 2, generator=g), torch.randn(2, 12, generator=g))
            for k in pre
        }
        for t in range(2)
    }
    experts = {n: {k: pre[k] + a[k].full() for k in pre} for n, a in adapters.items()}
    options = {"alpha": 0.3, "beta": 0.6}
    with pytest.raises(FusionBenchError, match="method.scope=model"):
        CoreSpace(base="lines", base_options=options)
    merged = CoreSpace(base="lines", base_options=options, scope="model").merge(pre, adapters)
    full = fusion_bench.merge("lines", pre, experts, **options)
    for key in pre:
        torch.testing.assert_close(merged[key], full[key], rtol=1e-5, atol=1e-5)


def test_api_merges_base_options_over_the_yaml_like_the_cli():
    from fusion_bench.api import build_method

    method, _ = build_method("lora/core_space_ties", {"base_options": {"scaling_factor": 0.3}})
    rule = method.base_method()
    assert (rule.scaling_factor, rule.threshold, rule.merge_func) == (0.3, 30, "mean")


def test_expanded_experts_keep_float32_over_a_half_precision_base():
    pool_pre = {"w": torch.randn(8, 6).half()}

    class Pre(dict):
        def shape(self, key):
            return tuple(self[key].shape)

    from fusion_bench.modelpool.lora import ExpandedLoRA

    adapter = {"w": LowRank(1e-3 * torch.randn(8, 2), torch.randn(2, 6))}
    expanded = ExpandedLoRA(Pre(pool_pre), adapter)["w"]
    assert expanded.dtype == torch.float32
    torch.testing.assert_close(expanded - pool_pre["w"].float(), adapter["w"].full())
