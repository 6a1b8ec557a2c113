"""Fusion of independently trained towers (issue 15): the tower forward, the alignment plumbing
(a permuted copy of a model is recovered exactly by every hard alignment method), Sinkhorn,
identity alignment = averaging, heterogeneous widths, PLeaS's width, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import fusion_bench
from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import Context
from fusion_bench.method.fusion import Members, activation_stats, average, fuse
from fusion_bench.method.fusion.activation_matching import ActivationMatching
from fusion_bench.method.fusion.align import (
    apply_maps,
    assign_heads,
    group_size,
    groups,
    permutation_matrix,
    transport,
    units,
)
from fusion_bench.method.fusion.ot_fusion import OTFusion
from fusion_bench.method.fusion.pleas import PLeaS
from fusion_bench.method.fusion.tower import TowerSpec, forward
from fusion_bench.method.fusion.vanilla_average import VanillaAverage
from fusion_bench.method.fusion.weight_matching import WeightMatching, weight_matching
from fusion_bench.modelpool.independent import IndependentModelPool
from fusion_bench.modelpool.open_clip import OpenCLIPModelPool
from fusion_bench.paths import resolve_path
from fusion_bench.taskpool.clip_classification import CLIPClassificationTaskPool
from fusion_bench.taskpool.data import TaskData
from tests.conftest import TASKS

SCRATCH = "fusion_bench:tiny8/scratch/seed0.safetensors"
TINY8_TASKS = ["tiny8_mnist", "tiny8_fashion"]


def tiny8_base() -> OpenCLIPModelPool:
    return OpenCLIPModelPool(
        "Tiny8-ViT",
        "fusion_bench:tiny8/pretrained.safetensors",
        {},
        model_config="fusion_bench:tiny8/Tiny8-ViT.json",
    )


def scratch_state() -> dict:
    return {k: v.float() for k, v in load_file(resolve_path(SCRATCH)).items()}


def random_permutation(spec: TowerSpec, seed: int) -> dict:
    """A random symmetry of the tower: residual stream, MLP hidden units, and attention (one
    head permutation per block for q, k and v; within heads one for q/k, another for v)."""
    gen = torch.Generator().manual_seed(seed)
    maps = {}
    for unit in units(spec):
        if len(unit) == 2:
            heads = torch.randperm(spec.heads, generator=gen)
            d = spec.head_dim
            for g in unit:
                cols = torch.cat(
                    [heads[h] * d + torch.randperm(d, generator=gen) for h in range(spec.heads)]
                )
                maps[g] = permutation_matrix(cols.numpy())
        else:
            g = unit[0]
            maps[g] = permutation_matrix(torch.randperm(group_size(spec, g), generator=gen).numpy())
    return maps


@pytest.fixture(scope="module")
def copy_pool(tmp_path_factory):
    """The seed-0 tiny8 scratch tower and a randomly permuted copy of it (same function, every
    weight in another order)."""
    state = scratch_state()
    spec = TowerSpec.of(state, heads=6)
    copy = apply_maps(state, spec, random_permutation(spec, seed=1))
    path = tmp_path_factory.mktemp("copy") / "copy.safetensors"
    save_file({k: v.contiguous() for k, v in copy.items()}, path)
    pool = IndependentModelPool(
        tiny8_base(), {"anchor": SCRATCH, "copy": str(path)}, tasks=TINY8_TASKS
    )
    return pool, state, copy, spec


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# -- the tower -----------------------------------------------------------------------------------
def test_forward_equals_the_open_clip_module(independent_pool):
    pool = IndependentModelPool(tiny8_base(), {"a": SCRATCH, "b": SCRATCH}, TINY8_TASKS)
    for p, name in ((pool, "a"), (independent_pool, "seed0")):
        state = {k: v.float() for k, v in p.expert(name).items()}
        images = torch.randn(3, 3, *p.build_encoder(state).image_size)
        with torch.no_grad():
            ours, acts = forward(state, p.spec(name), images, record=True)
            theirs = p.build_encoder(state)(images)
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)
        assert acts["res.0"].shape[1] == p.spec(name).width


def test_a_random_symmetry_keeps_the_function_and_changes_the_weights(copy_pool):
    _, state, copy, spec = copy_pool
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(
            forward(state, spec, images)[0], forward(copy, spec, images)[0], atol=1e-4
        )
    assert max_diff(state, copy) > 0.1


# -- the oracle: a permuted copy is recovered exactly -------------------------------------------
@pytest.mark.parametrize(
    "method",
    [
        WeightMatching(),
        ActivationMatching(num_samples=64, batch_size=32),
        OTFusion(solver="emd", num_samples=64, batch_size=32),
        OTFusion(cost="wts", solver="emd"),
        PLeaS(num_samples=64, batch_size=32, steps=0),
    ],
    ids=["weight_matching", "activation_matching", "ot_emd_acts", "ot_emd_wts", "pleas"],
)
def test_fusing_a_model_with_a_permuted_copy_gives_the_model(copy_pool, method):
    pool, state, copy, _ = copy_pool
    fused = method.merge(pool, TaskData(), Context())
    assert max_diff(fused, state) < 1e-5
    average_of_unaligned = VanillaAverage().merge(pool, TaskData(), Context())
    assert max_diff(average_of_unaligned, state) > 0.05  # without alignment it is not the model


def test_pleas_least_squares_keeps_a_permuted_copy_within_adam_noise(copy_pool):
    pool, state, _, spec = copy_pool
    fused = PLeaS(num_samples=64, batch_size=32, steps=20, width=1.5).merge(
        pool, TaskData(), Context()
    )
    wide = TowerSpec.of(fused, heads=6)
    assert wide.mlp == (1152,) * 6  # 768 · 1.5: a quarter of the neurons kept twice
    images = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref, out = forward(state, spec, images)[0], forward(fused, wide, images)[0]
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2


def test_pleas_partial_merge_of_a_copy_is_exact_at_every_width(copy_pool):
    pool, state, _, spec = copy_pool
    images = torch.randn(8, 3, 32, 32)
    for width in (1.0, 1.25, 2.0):
        fused = PLeaS(num_samples=64, batch_size=32, steps=0, width=width).merge(
            pool, TaskData(), Context()
        )
        wide = TowerSpec.of(fused, heads=6)
        assert wide.mlp[0] == round(768 * width)
        with torch.no_grad():
            assert torch.allclose(
                forward(fused, wide, images)[0], forward(state, spec, images)[0], atol=1e-4
            )
        assert pool.build_encoder(fused) is not None  # a tower open_clip can build


def test_sinkhorn_plan_concentrates_on_the_true_permutation(copy_pool):
    pool, state, copy, spec = copy_pool
    members = Members(["a", "b"], {"a": spec, "b": spec}, {"a": state, "b": copy}, "a")
    truth = random_permutation(spec, seed=1)
    stats = activation_stats(members, iter([torch.randn(16, 3, 32, 32)]), "cpu")
    for g in ("res", "qk.0", "mlp.3"):
        plan = transport(stats["b"].distance(g, standardize=True), "sinkhorn", 0.01)
        assert torch.equal(plan.argmax(1), truth[g].argmax(0))  # copy -> anchor: the inverse
        assert torch.allclose(plan.sum(1), torch.full_like(plan[:, 0], 1 / plan.shape[0]))


def test_weight_matching_of_two_different_towers_raises_their_inner_product(independent_pool):
    a = {k: v.float() for k, v in independent_pool.expert("seed0").items()}
    b = {k: v.float() for k, v in independent_pool.expert("seed1").items()}
    spec = independent_pool.spec("seed0")
    maps = weight_matching(a, b, spec)
    aligned = apply_maps(b, spec, maps)

    def inner(x):
        return sum(float((x[k] * a[k]).sum()) for k in a if k in x)

    assert inner(aligned) > inner(b)


def test_head_assignment_is_shared_by_queries_keys_and_values():
    torch.manual_seed(0)
    qk, v = torch.rand(8, 8), torch.rand(8, 8)
    p_qk, p_v = assign_heads([qk, v], heads=2)
    # whole heads move together, the same way in both groups
    head = lambda p: p.argmax(1) // 4  # noqa: E731
    assert torch.equal(head(p_qk), head(p_v))
    assert all(len(set(head(p_qk)[i * 4 : (i + 1) * 4].tolist())) == 1 for i in range(2))


def test_identity_alignment_is_averaging(independent_pool):
    names = independent_pool.expert_names
    states = {n: {k: v.float() for k, v in independent_pool.expert(n).items()} for n in names}
    specs = {n: independent_pool.spec(n) for n in names}
    members = Members(names, specs, states, names[0])
    identity = {
        n: {g: torch.eye(group_size(specs[n], g), dtype=torch.float64) for g in groups(specs[n])}
        for n in names[1:]
    }
    fused = fuse(members, identity)
    expected = average([states[n] for n in names])
    assert max_diff(fused, expected) < 1e-6


# -- heterogeneous widths --------------------------------------------------------------------------
def narrow_pool(open_clip_pool_files, independent_pool_files) -> IndependentModelPool:
    f = open_clip_pool_files
    base = OpenCLIPModelPool(f["model_name"], f["pretrained"], {}, model_config=f["config"])
    models = dict(independent_pool_files["models"], narrow=independent_pool_files["narrow"])
    return IndependentModelPool(
        base, models, list(TASKS), {"narrow": independent_pool_files["narrow_config"]}
    )


@pytest.mark.parametrize("anchor,width", [("narrow", 16), ("seed0", 32)])
def test_ot_fusion_of_different_widths_has_the_anchors_width(
    open_clip_pool_files, independent_pool_files, tiny_datasets, anchor, width
):
    pool = narrow_pool(open_clip_pool_files, independent_pool_files)
    taskpool = CLIPClassificationTaskPool(list(TASKS), datasets=tiny_datasets, fast_dev_run=True)
    for cost in ("acts", "wts"):
        method = OTFusion(anchor=anchor, cost=cost, num_samples=8, batch_size=4)
        fused = method.merge(pool, taskpool.data, Context())
        assert fused["conv1.weight"].shape[0] == width
        assert fused["transformer.resblocks.0.mlp.c_fc.weight"].shape == (4 * width, width)
        assert all(t.isfinite().all() for t in fused.values())
    metrics = fusion_bench.evaluate(
        "fusion/ot_fusion", pool, taskpool, anchor=anchor, num_samples=8, batch_size=4
    )
    assert 0.0 <= metrics["test/avg_acc"] <= 1.0


def test_permutation_methods_refuse_different_widths(open_clip_pool_files, independent_pool_files):
    pool = narrow_pool(open_clip_pool_files, independent_pool_files)
    with pytest.raises(FusionBenchError, match="ot_fusion fuses models of different widths"):
        WeightMatching().merge(pool, TaskData(), Context())
    with pytest.raises(FusionBenchError, match="vanilla averaging needs equal widths"):
        VanillaAverage().merge(pool, TaskData(), Context())


# -- bad input -------------------------------------------------------------------------------------
def test_one_model_is_refused(open_clip_pool_files, independent_pool_files):
    base = OpenCLIPModelPool(
        open_clip_pool_files["model_name"],
        open_clip_pool_files["pretrained"],
        {},
        model_config=open_clip_pool_files["config"],
    )
    pool = IndependentModelPool(base, {"seed0": independent_pool_files["models"]["seed0"]})
    with pytest.raises(FusionBenchError, match="at least two models"):
        WeightMatching().merge(pool, TaskData(), Context())


def test_architectures_that_differ_beyond_width_are_refused(
    open_clip_pool_files, independent_pool_files, tmp_path
):
    state = load_file(independent_pool_files["models"]["seed0"])
    deeper = dict(state)
    for k, v in state.items():  # a third block: another depth
        if k.startswith("transformer.resblocks.1."):
            deeper[k.replace("resblocks.1.", "resblocks.2.")] = v.clone()
    save_file(deeper, tmp_path / "deeper.safetensors")
    base = OpenCLIPModelPool(
        open_clip_pool_files["model_name"],
        open_clip_pool_files["pretrained"],
        {},
        model_config=open_clip_pool_files["config"],
    )
    pool = IndependentModelPool(
        base,
        {
            "seed0": independent_pool_files["models"]["seed0"],
            "deeper": str(tmp_path / "deeper.safetensors"),
        },
    )
    with pytest.raises(FusionBenchError, match="differ beyond width.*layers 2 vs 3"):
        pool.check_members()


def test_mismatched_head_counts_are_refused(open_clip_pool_files, independent_pool_files, tmp_path):
    config = json.loads(open(open_clip_pool_files["config"]).read())
    config["vision_cfg"]["head_width"] = 8  # 4 heads of 8 instead of 2 of 16
    (tmp_path / "heads4.json").write_text(json.dumps(config))
    base = OpenCLIPModelPool(
        open_clip_pool_files["model_name"],
        open_clip_pool_files["pretrained"],
        {},
        model_config=open_clip_pool_files["config"],
    )
    models = independent_pool_files["models"]
    pool = IndependentModelPool(
        base,
        {"seed0": models["seed0"], "seed1": models["seed1"]},
        model_configs={"seed1": str(tmp_path / "heads4.json")},
    )
    with pytest.raises(FusionBenchError, match="head_dim 16 vs 8"):
        pool.check_members()


def test_task_vector_methods_are_refused_on_an_independent_pool(independent_pool):
    with pytest.raises(FusionBenchError, match="no common pretrained image tower.*fusion/"):
        fusion_bench.merge("task_arithmetic", independent_pool)


def test_fusion_methods_are_refused_on_a_pool_of_fine_tuned_experts(open_clip_pool):
    with pytest.raises(FusionBenchError, match="needs an independent model pool"):
        WeightMatching().merge(open_clip_pool, TaskData(), Context())


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: WeightMatching(anchor="seed9"), "method.anchor 'seed9' is not a model"),
        (lambda: PLeaS(width=3.5), "more than the number of models"),
    ],
)
def test_bad_choices_name_the_option(independent_pool, make, message):
    with pytest.raises(FusionBenchError, match=message):
        make().merge(independent_pool, TaskData(), Context())


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: OTFusion(reg=0.0), "Sinkhorn needs a regularisation"),
        (lambda: OTFusion(split="test"), "never on the test split"),
        (lambda: PLeaS(width=0.5), "at least 1"),
        (lambda: WeightMatching(max_iter=0), "at least 1 sweep"),
    ],
)
def test_bad_hyperparameters_fail_at_construction(make, message):
    with pytest.raises(FusionBenchError, match=message):
        make()


def test_a_missing_model_file_is_named(open_clip_pool_files, independent_pool_files):
    base = OpenCLIPModelPool(
        open_clip_pool_files["model_name"],
        open_clip_pool_files["pretrained"],
        {},
        model_config=open_clip_pool_files["config"],
    )
    pool = IndependentModelPool(
        base, {"seed0": independent_pool_files["models"]["seed0"], "gone": "/nowhere/x.safetensors"}
    )
    with pytest.raises(
        FusionBenchError, match="Model 'gone'.*does not exist.*modelpool.models.gone"
    ):
        pool.check_members()


# -- the user's path -------------------------------------------------------------------------------
def test_fused_model_saves_and_reloads_through_the_cli(independent_cli_args, tmp_path, capsys):
    from tests.test_cli import run_cli

    common = [*independent_cli_args, "fast_dev_run=true", "logger=none"]
    code, out, err = run_cli(
        [
            *common,
            "method=fusion/weight_matching",
            f"merged_model_save_path={tmp_path / 'fused'}",
            f"report_save_path={tmp_path / 'a.json'}",
            f"hydra.run.dir={tmp_path / 'a'}",
        ],
        capsys,
    )
    assert code == 0, err[-2000:]
    code, out, err = run_cli(
        [
            *common,
            f"+modelpool.models.fused={tmp_path / 'fused' / 'model.safetensors'}",
            "method=fusion/parent",
            "method.name=fused",
            f"report_save_path={tmp_path / 'b.json'}",
            f"hydra.run.dir={tmp_path / 'b'}",
        ],
        capsys,
    )
    assert code == 0, err[-2000:]
    a = json.loads((tmp_path / "a.json").read_text())["metrics"]
    b = json.loads((tmp_path / "b.json").read_text())["metrics"]
    assert a == b


def test_the_ensemble_runs_on_an_independent_pool(independent_pool, tiny_datasets):
    taskpool = CLIPClassificationTaskPool(list(TASKS), datasets=tiny_datasets, fast_dev_run=True)
    metrics = fusion_bench.evaluate("simple_ensemble", independent_pool, taskpool)
    assert "test/avg_acc" in metrics


def test_finetuning_after_fusion_changes_the_model(independent_pool, tiny_datasets):
    taskpool = CLIPClassificationTaskPool(list(TASKS), datasets=tiny_datasets)
    data = taskpool.data
    before = VanillaAverage().merge(independent_pool, data, Context())
    after = VanillaAverage(finetune_steps=3, finetune_batch_size=8).merge(
        independent_pool, data, Context()
    )
    assert set(after) == set(before)
    assert max_diff(after, before) > 0
    assert all(t.isfinite().all() for t in after.values())


# -- review follow-ups: exactness at unequal widths, optimality, statistics -----------------------
def duplication(spec: TowerSpec) -> dict:
    """Maps (n → 2n) that widen a tower without changing its function: every residual and MLP
    neuron gets a twin, every attention head a twin head (same within-head order)."""
    maps = {}
    for g in groups(spec):
        n = group_size(spec, g)
        t = torch.zeros(n, 2 * n, dtype=torch.float64)
        if g.startswith(("qk.", "v.")):  # head h -> heads h and h + H
            d, h = spec.head_dim, spec.heads
            for i in range(n):
                t[i, i] = t[i, i + h * d] = 1.0
        else:
            t[torch.arange(n), torch.arange(n)] = 1.0
            t[torch.arange(n), torch.arange(n) + n] = 1.0
        maps[g] = t
    return maps


@pytest.fixture(scope="module")
def wide_twin_pool(open_clip_pool_files, independent_pool_files, tmp_path_factory):
    """seed0 of the tiny independent pool (width 32) and its exact twin of width 64."""
    root = tmp_path_factory.mktemp("twin")
    state = {k: v.float() for k, v in load_file(independent_pool_files["models"]["seed0"]).items()}
    spec = TowerSpec.of(state, heads=2)
    wide = apply_maps(state, spec, duplication(spec))
    save_file({k: v.contiguous() for k, v in wide.items()}, root / "wide.safetensors")
    config = json.loads(open(open_clip_pool_files["config"]).read())
    config["vision_cfg"]["width"] = 64
    (root / "wide.json").write_text(json.dumps(config))
    f = open_clip_pool_files
    base = OpenCLIPModelPool(f["model_name"], f["pretrained"], {}, model_config=f["config"])
    pool = IndependentModelPool(
        base,
        {
            "seed0": independent_pool_files["models"]["seed0"],
            "wide": str(root / "wide.safetensors"),
        },
        list(TASKS),
        {"wide": str(root / "wide.json")},
    )
    return pool, state, wide


def test_a_widened_twin_computes_the_same_function(wide_twin_pool):
    pool, state, wide = wide_twin_pool
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref = forward(state, pool.spec("seed0"), images)[0]
        out = forward(wide, pool.spec("wide"), images)[0]
    assert pool.spec("wide").heads == 4
    assert torch.allclose(ref, out, atol=1e-5)


@pytest.mark.parametrize("anchor", ["seed0", "wide"])
def test_ot_emd_fuses_a_widened_twin_into_either_width_exactly(
    wide_twin_pool, tiny_datasets, anchor
):
    """Unequal widths: EMD sends each narrow neuron to its two twins (or both twins to it); the
    producing side averages, the consuming side shares out, so the fused model is the anchor
    exactly (the authors' scalar T·n would double or halve the residual stream here)."""
    pool, state, wide = wide_twin_pool
    taskpool = CLIPClassificationTaskPool(list(TASKS), datasets=tiny_datasets)
    fused = OTFusion(anchor=anchor, solver="emd", num_samples=16, batch_size=8).merge(
        pool, taskpool.data, Context()
    )
    assert max_diff(fused, state if anchor == "seed0" else wide) < 1e-5


def test_head_structured_assignment_is_optimal():
    """Brute force over every head order and within-head permutations (2 heads of 2)."""
    import itertools

    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        qk, v = torch.rand(4, 4, generator=gen), torch.rand(4, 4, generator=gen)
        p_qk, p_v = assign_heads([qk, v], heads=2)
        found = float((qk * p_qk).sum() + (v * p_v).sum())
        best = float("inf")
        for order in itertools.permutations(range(2)):
            for inner in itertools.product(itertools.permutations(range(2)), repeat=4):
                cost = 0.0
                for h in range(2):
                    for i in range(2):
                        cost += qk[2 * h + i, 2 * order[h] + inner[h][i]]
                        cost += v[2 * h + i, 2 * order[h] + inner[2 + h][i]]
                best = min(best, float(cost))
        assert found == pytest.approx(best)


def test_standardized_distance_of_a_constant_neuron_matches_the_direct_formula():
    from fusion_bench.method.fusion import ActivationStats

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(300, 4, generator=gen, dtype=torch.float64) * 3 + 7
    b = torch.randn(300, 5, generator=gen, dtype=torch.float64) - 2
    a[:, 1] = 5.3  # a constant neuron: z-scores 0
    stats = ActivationStats()
    for i in range(0, 300, 100):
        stats.add("g", a[i : i + 100], b[i : i + 100])

    def z(x):
        return (x - x.mean(0)) / (x.std(0, unbiased=False) + 1e-9)

    assert torch.allclose(stats.distance("g", True), torch.cdist(z(a).T, z(b).T), atol=1e-6)
    assert torch.allclose(stats.distance("g", False), torch.cdist(a.T, b.T), atol=1e-6)


def test_pleas_least_squares_objective_is_zero_on_a_copy_and_falls_on_two_towers(
    copy_pool, independent_pool
):
    from fusion_bench.method.fusion.activation_matching import permutations
    from fusion_bench.method.fusion.pleas import (
        least_squares,
        objective,
        partial_merge,
        teacher,
    )

    for pool, images in ((copy_pool[0], torch.randn(8, 3, 32, 32)), (independent_pool, None)):
        names = pool.expert_names[:2]
        specs = {n: pool.spec(n) for n in names}
        states = {n: {k: v.float() for k, v in pool.expert(n).items()} for n in names}
        members = Members(names, specs, states, names[0])
        spec = specs[names[0]]
        size = pool.build_encoder(states[names[0]]).image_size
        images = torch.randn(16, 3, *size, generator=torch.Generator().manual_seed(0))
        stats = activation_stats(members, iter(images.split(8)), "cpu")
        perms = {names[1]: permutations(stats[names[1]], spec)}
        aligned = [states[names[0]], apply_maps(states[names[1]], spec, perms[names[1]])]
        state, layout = partial_merge(aligned, spec, {})
        target = teacher(members, perms, layout, images, "cpu")
        before = float(objective(state, target, spec))
        if pool is copy_pool[0]:
            assert before < 1e-20
            continue
        fitted = least_squares(state, members, perms, layout, images, 30, 5e-3, 16, 0, "cpu")
        assert float(objective(fitted, target, spec)) < 0.8 * before


def test_a_narrower_member_without_its_config_is_named(
    open_clip_pool_files, independent_pool_files
):
    f = open_clip_pool_files
    base = OpenCLIPModelPool(f["model_name"], f["pretrained"], {}, model_config=f["config"])
    pool = IndependentModelPool(
        base,
        {
            "seed0": independent_pool_files["models"]["seed0"],
            "narrow": independent_pool_files["narrow"],
        },
    )
    with pytest.raises(FusionBenchError, match="width 16 but its config says 32.*model_configs"):
        pool.check_members()


def test_an_incomplete_tower_is_named(independent_pool_files, tmp_path):
    state = load_file(independent_pool_files["models"]["seed0"])
    del state["transformer.resblocks.0.mlp.c_fc.bias"]
    with pytest.raises(FusionBenchError, match="not a complete open_clip ViT tower"):
        TowerSpec.of(state, heads=2)


def test_quick_gelu_towers_forward_like_open_clip():
    import open_clip.model as oc

    cfg = oc.CLIPVisionCfg(image_size=16, layers=2, width=32, patch_size=8, head_width=16)
    torch.manual_seed(0)
    tower = oc._build_vision_tower(16, cfg, quick_gelu=True).eval()
    state = {k: v.float() for k, v in tower.state_dict().items()}
    spec = TowerSpec.of(state, heads=2, quick_gelu=True)
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(forward(state, spec, images)[0], tower(images), atol=1e-5)
        plain = TowerSpec.of(state, heads=2)
        assert not torch.allclose(forward(state, plain, images)[0], tower(images), atol=1e-5)
