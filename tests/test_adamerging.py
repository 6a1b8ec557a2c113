"""AdaMerging oracles on the tiny pools: λ fixed → task arithmetic, entropy goes down, λ stays in
[0, 1], saved λ reproduce the merge, layer-wise with equal λ = task-wise; plus CLI runs."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.adamerging import (
    AdaMerging,
    entropy,
    merge_with_lambdas,
    stack_task_vectors,
)
from fusion_bench.method.base import Context, pool_experts
from fusion_bench.method.task_arithmetic import TaskArithmetic
from fusion_bench.taskpool.data import TaskData
from fusion_bench.testing import as_experts, assert_state_dict_close
from tests.conftest import TASKS
from tests.test_cli import run_cli
from tests.wandb_records import wait_for_logged


def method(**kw) -> AdaMerging:
    kw = {"max_steps": 3, "batch_size": 24, **kw}
    return AdaMerging(**kw)


def run(m: AdaMerging, pool, datasets=None) -> dict[str, torch.Tensor]:
    """The method's merge on ``pool``, with the tiny datasets as task data (no output dir)."""
    return m.merge(pool, TaskData(datasets=datasets), Context())


# -- pure pieces -----------------------------------------------------------------------------
def test_merge_closed_form_and_layer_wise_equals_task_wise():
    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.randn(3, 2, generator=g), "b": torch.randn(3, generator=g)}
    fts = [{k: v + torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(2)]
    tvs = stack_task_vectors(pre, as_experts(fts), ["w", "b"])
    lam = torch.tensor([0.2, 0.7])
    expected = {k: pre[k] + 0.2 * (fts[0][k] - pre[k]) + 0.7 * (fts[1][k] - pre[k]) for k in pre}
    assert_state_dict_close(merge_with_lambdas(pre, tvs, lam), expected)
    layer = lam[:, None].expand(2, 2).clone()  # (N, L): the same λ for every tensor
    assert_state_dict_close(merge_with_lambdas(pre, tvs, layer), expected)
    # bfloat16 task vectors: close to the float32 merge
    tvs16 = stack_task_vectors(pre, as_experts(fts), ["w", "b"], torch.bfloat16)
    assert_state_dict_close(merge_with_lambdas(pre, tvs16, lam), expected, atol=3e-2, rtol=1e-2)


def test_entropy_closed_form():
    assert entropy(torch.zeros(4, 10)).item() == pytest.approx(torch.log(torch.tensor(10.0)).item())
    assert entropy(torch.tensor([[100.0, 0.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)


# -- the method on the tiny pools ------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_lr_zero_is_task_arithmetic(open_clip_pool, tiny_datasets, granularity):
    merged = run(
        method(granularity=granularity, lr=0.0, max_steps=2), open_clip_pool, tiny_datasets
    )
    expected = TaskArithmetic(scaling_factor=0.3).merge(
        open_clip_pool.pretrained(), pool_experts(open_clip_pool)
    )
    assert_state_dict_close(merged, expected)


def test_plusplus_lr_zero_is_ties_sum(open_clip_pool, tiny_datasets):
    # AdaMerging++ with λ fixed at 0.3 = TIES with the disjoint *sum* scaled by 0.3
    from fusion_bench.method.ties_merging import TiesMerging

    m = method(granularity="task", lr=0.0, max_steps=1, ties_threshold=20)
    merged = run(m, open_clip_pool, tiny_datasets)
    expected = TiesMerging(scaling_factor=0.3, threshold=20, merge_func="sum").merge(
        open_clip_pool.pretrained(), pool_experts(open_clip_pool)
    )
    assert_state_dict_close(merged, expected)


def test_entropy_decreases_and_lambda_in_bounds(hf_pool, tiny_datasets):
    # batch = the whole test split (24 images): the loss is a deterministic function of λ
    m = method(lr=0.05, max_steps=15, log_every=1)
    run(m, hf_pool, tiny_datasets)
    losses = [r["tta/loss"] for r in m.history]
    assert losses[-1] < losses[0] - 1e-4, losses
    assert set(m.history[0]) >= {"tta/loss", *(f"tta/{t}/entropy" for t in TASKS)}


def test_lambda_clamped_with_large_lr(open_clip_pool, tiny_datasets, tmp_path):
    stem = tmp_path / "w"
    run(method(lr=10.0, max_steps=3, save_weights=str(stem)), open_clip_pool, tiny_datasets)
    lam = torch.tensor(json.loads(stem.with_suffix(".json").read_text())["lambdas"])
    assert lam.shape[0] == len(TASKS) and lam.min() >= 0.0 and lam.max() <= 1.0
    assert ((lam == 0.0) | (lam == 1.0)).any()  # the steps really left the interval


def test_saved_lambdas_reproduce_the_merge(open_clip_pool, tiny_datasets, tmp_path):
    stem = tmp_path / "out" / "adamerging_weights"
    adapted = run(method(lr=0.05, save_weights=str(stem)), open_clip_pool, tiny_datasets)
    for suffix in (".safetensors", ".json"):
        reloaded = run(AdaMerging(weights=str(stem.with_suffix(suffix))), open_clip_pool)
        assert_state_dict_close(reloaded, adapted, atol=0, rtol=0)
    with pytest.raises(FusionBenchError, match="ties_threshold"):
        run(AdaMerging(weights=str(stem) + ".json", ties_threshold=20), open_clip_pool)
    with pytest.raises(FusionBenchError, match="does not exist"):
        run(AdaMerging(weights=str(tmp_path / "nope.json")), open_clip_pool)


def test_constructor_checks_and_memory_estimate():
    with pytest.raises(FusionBenchError, match="granularity"):
        AdaMerging(granularity="block")
    with pytest.raises(FusionBenchError, match="percentage"):
        AdaMerging(ties_threshold=150)
    # θ0 + merged params + their gradient + N task vectors at 4 or 2 bytes per element
    assert AdaMerging().models_held(8) == 11.0
    assert AdaMerging(task_vector_dtype="bfloat16").models_held(8) == 7.0


# -- CLI -------------------------------------------------------------------------------------
@pytest.fixture
def cli_args(hf_cli_args) -> list[str]:
    return [
        *hf_cli_args,
        "method=adamerging_layer_wise",
        "method.max_steps=2",
        "method.batch_size=8",
        "logger=none",
    ]


def test_cli_run_then_reload(cli_args, tmp_path, capsys):
    code, out, err = run_cli(
        [*cli_args, "logger=wandb", "method.log_every=1", f"hydra.run.dir={tmp_path / 'a'}"], capsys
    )
    assert code == 0, err
    assert "== adamerging_layer_wise ==" in out
    (run_file,) = (tmp_path / "a").glob("wandb/offline-run-*/run-*.wandb")
    logged = wait_for_logged(run_file, "test/avg_acc")
    for key in (
        "tta/loss",
        "tta/lambda_mean",
        "tta/lambda_min",
        "tta/lambda_max",
        "test/avg_acc",
        *(f"tta/{t}/entropy" for t in TASKS),
    ):
        assert key in logged, sorted(logged)
    weights = tmp_path / "a" / "adamerging_weights.json"
    assert weights.is_file()
    first = json.loads((tmp_path / "a" / "report.json").read_text())["metrics"]
    code, _, err = run_cli(
        [*cli_args, f"hydra.run.dir={tmp_path / 'b'}", f"method.weights='{weights}'"], capsys
    )
    assert code == 0, err
    again = json.loads((tmp_path / "b" / "report.json").read_text())["metrics"]
    assert again == pytest.approx(first)


def test_cli_sweep(cli_args, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    code, _, err = run_cli(
        ["-m", *cli_args, "method.lr=0.0,0.01", f"hydra.sweep.dir={sweep}"], capsys
    )
    assert code == 0, err
    assert sorted(p.parent.name for p in sweep.glob("*/adamerging_weights.safetensors")) == [
        "0-adamerging_layer_wise",
        "1-adamerging_layer_wise",
    ]
    assert len(list(sweep.glob("*/report.json"))) == 2


def test_two_processes_on_cpu(cli_args, tmp_path):
    # fabric.devices=2 with DDP on CPU (gloo): the path several GPUs take, in fresh processes
    # (Lightning's launcher re-runs the command line, so not inside pytest's process). λ's
    # gradients are averaged over the ranks; only rank 0 prints, saves λ and writes the report.
    import subprocess
    import sys

    run_dir = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fusion_bench",
            *cli_args,
            "fabric.accelerator=cpu",
            "fabric.devices=2",
            "+fabric.strategy=ddp",
            f"hydra.run.dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting with 2 processes" in proc.stderr + proc.stdout
    assert proc.stdout.count("== adamerging_layer_wise ==") == 1, proc.stdout
    report = json.loads((run_dir / "report.json").read_text())
    assert 0.0 <= report["metrics"]["test/avg_acc"] <= 1.0
    lambdas = json.loads((run_dir / "adamerging_weights.json").read_text())["lambdas"]
    assert all(0.0 <= v <= 1.0 for row in lambdas for v in row)
