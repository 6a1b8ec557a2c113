"""Twin-Merging (fusion_bench/method/routed/twin_merging.py) against closed-form oracles and a
plain float64 re-statement of its rule:

θ_s = θ0 + α Σ_t (θ_t − θ0); v_t = θ_t − θ_s, truncated per matrix to its top ⌊f·min(m, n)⌋
singular triplets (dense float64 SVD here), other tensors whole; θ(x) = θ_s + Σ_t p_t(x) v_t.
"""

from __future__ import annotations

import math

import pytest
import torch

import fusion_bench
from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import Context
from fusion_bench.method.routed.checkpoint import read_routed, write_routed
from fusion_bench.method.routed.twin_merging import TwinMerging, TwinMergingModel
from fusion_bench.taskpool.clip_classification import CLIPClassificationTaskPool
from fusion_bench.taskpool.data import TaskData
from tests.conftest import TASKS

FAST = {"num_samples": 8, "batch_size": 8, "epochs": 3}


def build(pool, datasets, fast_dev_run: bool = False, **options) -> TwinMergingModel:
    method = TwinMerging(**{**FAST, **options})
    return method.build(pool, TaskData(datasets=datasets), Context(fast_dev_run=fast_dev_run))


def images(n: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def features(pool, state, x):
    encoder = pool.build_encoder(state)
    return pool.classifier(encoder).features(encoder, x)


def reference(pool, alpha: float, fraction: float) -> tuple[dict, dict]:
    """θ_s and {key: (T, *shape) dense v_t} from the paper's formulas, in float64."""
    pre = pool.pretrained()
    experts = [pool.expert(n) for n in pool.expert_names]
    shared, exclusive = {}, {}
    for key in pre:
        if not pre[key].is_floating_point():
            continue
        theta0 = pre[key].double()
        theta_s = theta0 + alpha * sum(e[key].double() - theta0 for e in experts)
        shared[key] = theta_s
        rows = []
        for e in experts:
            v = e[key].double() - theta_s
            if v.dim() == 2:
                r = math.floor(fraction * min(v.shape) + 1e-9)
                u, s, vh = torch.linalg.svd(v, full_matrices=False)
                v = (u[:, :r] * s[:r]) @ vh[:r]
            rows.append(v)
        exclusive[key] = torch.stack(rows)
    return shared, exclusive


# -- options ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "option,value",
    [
        ("rank_fraction", 0.0),
        ("rank_fraction", 1.5),
        ("num_samples", 0),
        ("batch_size", 1),
        ("epochs", 0),
        ("lr", 0.0),
        ("base", "individual"),
        ("base", "no_such_merge"),
    ],
)
def test_bad_options_name_the_option(option, value):
    with pytest.raises(FusionBenchError, match=rf"method\.{option}="):
        TwinMerging(**{option: value})


def test_rank_and_missing_data(open_clip_pool):
    assert TwinMerging(rank_fraction=0.29).rank((100, 300)) == 29
    assert TwinMerging().rank((768, 3072)) == 76
    assert TwinMerging().rank((5, 32)) == 0
    with pytest.raises(FusionBenchError, match="task pool"):
        TwinMerging(**FAST).build(open_clip_pool, None, Context())


def test_base_options_are_checked_by_the_base():
    with pytest.raises(FusionBenchError, match=r"method\.base='task_arithmetic'"):
        TwinMerging(base_options={"scaling_factor": "abc"})


# -- the rule ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def soft_model(open_clip_pool, tiny_datasets):
    return build(open_clip_pool, tiny_datasets, rank_fraction=0.25)


def test_compression_and_soft_mixing_match_the_float64_rule(open_clip_pool, soft_model):
    pool, model = open_clip_pool, soft_model
    shared, exclusive = reference(pool, alpha=0.3, fraction=0.25)
    tower = model.tower.pretrained()
    for key, theta_s in shared.items():  # θ_s is the tower's own parameters
        torch.testing.assert_close(tower[key].double(), theta_s, atol=1e-6, rtol=1e-6)
    for key, v in exclusive.items():
        if v.dim() == 3 and math.floor(0.25 * min(v.shape[1:]) + 1e-9) == 0:
            assert key not in model.delta_keys  # rank 0: no exclusive part
            continue
        got = model.exclusive(key).double()
        scale = max(float(v.abs().max()), 1e-12)
        assert float((got - v).abs().max()) / scale < 1e-5, key
        if v.dim() == 3:  # stored as U diag(s) (T, m, r) and Vᵀ (T, r, n)
            r = math.floor(0.25 * min(v.shape[1:]) + 1e-9)
            assert model.u.get(key).shape == (2, v.shape[1], r)
            assert model.v.get(key).shape == (2, r, v.shape[2])

    x = images(4)
    with torch.no_grad():
        out = model(x)
    p = model.last_routing
    assert p.shape == (4, len(TASKS))
    torch.testing.assert_close(p.sum(dim=1), torch.ones(4))
    for i in range(len(x)):  # θ(x_i) = θ_s + Σ_t p_it v_t, image by image
        weights = {}
        for key, theta_s in shared.items():
            delta = torch.einsum("t,t...->...", p[i].double(), exclusive[key])
            if key in model.delta_keys:
                weights[key] = (theta_s + delta).float()
            else:
                weights[key] = theta_s.float()
        pre = pool.pretrained()
        weights |= {k: pre[k] for k in pre if not pre[k].is_floating_point()}
        with torch.no_grad():
            expected = features(pool, weights, x[i : i + 1])
        torch.testing.assert_close(out[i : i + 1], expected, atol=1e-5, rtol=1e-4)


def test_router_sees_the_shared_models_mean_token(open_clip_pool, soft_model):
    """z(x) = mean over tokens of the last block's output under θ_s (the router's input)."""
    model, x = soft_model, images(3)
    blocks = model.tower.encoder.transformer.resblocks
    captured = []
    handle = blocks[-1].register_forward_hook(lambda m, a, out: captured.append(out))
    try:
        with torch.no_grad():
            model.tower(x)
    finally:
        handle.remove()
    with torch.no_grad():
        z = model.router_features(x)
    torch.testing.assert_close(z, captured[0].float().mean(dim=1))
    assert z.shape == (3, model.width)
    layers = [m for m in model.router if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in layers] == [(32, 64), (64, 64), (64, 2)]


# -- oracles ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["open_clip", "hf"])
def test_full_rank_oracle_is_each_expert(family, open_clip_pool, hf_pool, tiny_datasets):
    pool = open_clip_pool if family == "open_clip" else hf_pool
    model = build(pool, tiny_datasets, rank_fraction=1.0)
    x = images(3)
    for task in pool.expert_names:
        with torch.no_grad():
            got = model(x, task=task)
            expected = features(pool, pool.expert(task), x)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    with pytest.raises(FusionBenchError, match="not an expert"):
        model(x, task="cifar10")


def test_identical_experts_give_the_pretrained_model(open_clip_pool_files, tiny_datasets):
    from fusion_bench.modelpool.open_clip import OpenCLIPModelPool

    f = open_clip_pool_files
    pool = OpenCLIPModelPool(  # every expert is θ0 (the full CLIP file's image tower)
        f["model_name"],
        f["pretrained"],
        {t: f["pretrained"] for t in TASKS},
        model_config=f["config"],
    )
    model = build(pool, tiny_datasets)
    x = images(4)
    with torch.no_grad():
        expected = features(pool, None, x)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        for task in TASKS:
            torch.testing.assert_close(model(x, task=task), expected, atol=1e-5, rtol=1e-5)


def test_fast_dev_run_reads_one_batch_per_task(open_clip_pool, tiny_datasets, monkeypatch):
    calls = []
    original = TwinMergingModel.router_features

    def counting(self, x):
        calls.append(len(x))
        return original(self, x)

    monkeypatch.setattr(TwinMergingModel, "router_features", counting)
    build(open_clip_pool, tiny_datasets, fast_dev_run=True, num_samples=4, batch_size=2)
    assert calls == [2, 2]  # one batch of 2 per task, not 2 batches


# -- the router learns the task ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def separable_datasets(tmp_path_factory):
    """mnist: dark noise images, eurosat: bright ones (the router's features differ)."""
    import datasets
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("twin_datasets")
    out = {}
    for i, task in enumerate(TASKS):
        low, high = (0, 80) if i == 0 else (175, 255)
        rng = np.random.default_rng(i)
        features_ = datasets.Features(
            {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}
        )
        for split, n in {"train": 100, "test": 16}.items():
            labels = [j % 10 for j in range(n)]
            pictures = [
                Image.fromarray(rng.integers(low, high, (20, 20, 3), dtype=np.uint8))
                for _ in labels
            ]
            ds = datasets.Dataset.from_dict(
                {"image": pictures, "label": labels}, features=features_
            )
            (root / task).mkdir(exist_ok=True)
            ds.to_parquet(str(root / task / f"{split}.parquet"))
        out[task] = str(root / task)
    return out


def test_trained_router_sends_each_task_to_its_expert(open_clip_pool, separable_datasets):
    taskpool = CLIPClassificationTaskPool(list(TASKS), datasets=separable_datasets)
    method = TwinMerging(num_samples=10, batch_size=64, epochs=30)
    metrics = fusion_bench.evaluate(method, open_clip_pool, taskpool)
    for task in TASKS:  # chance is 0.5
        assert metrics[f"routing/test/{task}/acc"] >= 0.9, metrics
        assert f"oracle/test/{task}/acc" in metrics


# -- save and reload ----------------------------------------------------------------------------------
def test_save_reload_round_trip(open_clip_pool, soft_model, tmp_path):
    pool, model = open_clip_pool, soft_model
    method = TwinMerging(**FAST, rank_fraction=0.25)
    write_routed(model, method, pool, tmp_path, "card")
    again = read_routed(tmp_path, pool)
    assert isinstance(again, TwinMergingModel) and not again.training
    x = images(4, seed=1)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
        assert torch.equal(again.last_routing, model.last_routing)
        for task in TASKS:
            assert torch.equal(again(x, task=task), model(x, task=task))
    assert again.stored_parameters() == model.stored_parameters()

    # storage: θ_s + T·r(m + n) per matrix + T × the other tensors + the router
    tower = sum(t.numel() for t in pool.pretrained().values())
    exclusive = 0
    for key in model.delta_keys:
        shape = model.tower.pretrained()[key].shape
        if len(shape) == 2:
            r = math.floor(0.25 * min(shape) + 1e-9)
            exclusive += 2 * r * (shape[0] + shape[1])
        else:
            exclusive += 2 * math.prod(shape)
    router = sum(p.numel() for p in model.router.parameters())
    router += sum(b.numel() for b in model.router.buffers())
    assert model.stored_parameters() == tower + exclusive + router

    state = dict(model.state_dict())
    state.pop(next(k for k in state if k.startswith("router.")))
    with pytest.raises(FusionBenchError, match="does not fit"):
        method.load(pool, list(TASKS), state)
