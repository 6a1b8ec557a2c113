"""Task pool: data splits, the head cache, per-task models, accuracy against a hand computation."""

from __future__ import annotations

import pytest
import torch

from fusion_bench.errors import FusionBenchError
from fusion_bench.taskpool.clip_classification import CLIPClassificationTaskPool
from tests.conftest import TASKS


@pytest.fixture
def pool(open_clip_pool):
    return open_clip_pool


@pytest.fixture
def taskpool(tiny_datasets):
    return CLIPClassificationTaskPool(
        tasks=list(TASKS), splits=["validation", "test"], datasets=tiny_datasets, batch_size=8
    )


def test_validation_is_carved_from_train_deterministically(taskpool):
    val = taskpool.data.load_split("mnist", "validation", taskpool.max_samples_per_task)
    assert len(val) == 4  # 10% of 40 training images
    again = taskpool.data.load_split("mnist", "validation", taskpool.max_samples_per_task)
    assert val["label"] == again["label"]
    assert len(taskpool.data.load_split("mnist", "test", taskpool.max_samples_per_task)) == 24


def test_max_samples_is_a_seeded_subset(tiny_datasets):
    tp = CLIPClassificationTaskPool(
        tasks=["mnist"], datasets=tiny_datasets, max_samples_per_task=10
    )
    ds = tp.data.load_split("mnist", "test", tp.max_samples_per_task)
    assert len(ds) == 10
    assert len(set(ds["label"])) > 1  # not just the first (class-sorted) rows


def test_head_cache_second_run_builds_none(pool, taskpool, monkeypatch, tmp_path):
    monkeypatch.setenv("FUSION_BENCH_CACHE", str(tmp_path))
    classifier = pool.classifier(pool.build_encoder())
    calls = []
    original = classifier.zero_shot_head
    classifier.zero_shot_head = lambda *a: calls.append(a) or original(*a)
    first = taskpool.evaluate(classifier)
    assert len(calls) == len(TASKS)
    second = taskpool.evaluate(classifier)
    assert len(calls) == len(TASKS)  # all heads came from the cache
    assert first == second
    assert len(list((tmp_path / "heads").glob("*.pt"))) == len(TASKS)


def test_accuracy_matches_hand_computation(pool, taskpool):
    classifier = pool.classifier(pool.build_encoder())
    metrics = taskpool.evaluate(classifier)
    ds = taskpool.data.load_split("eurosat", "test", taskpool.max_samples_per_task)
    images = torch.stack([classifier.preprocess(im) for im in ds["image"]])
    head = taskpool.data.zero_shot_head(classifier, "eurosat", torch.device("cpu"))
    with torch.no_grad():
        feats = classifier.encoder(images)
        logits = classifier.logit_scale * torch.nn.functional.normalize(feats, dim=-1) @ head
    expected = (logits.argmax(-1) == torch.tensor(ds["label"])).float().mean().item()
    assert metrics["test/eurosat/acc"] == pytest.approx(expected)
    assert metrics["test/avg_acc"] == pytest.approx(
        (metrics["test/eurosat/acc"] + metrics["test/mnist/acc"]) / 2
    )


def test_per_task_models_and_missing_task(pool, taskpool):
    per_task = {t: pool.classifier(pool.build_encoder(pool.expert(t))) for t in TASKS}
    metrics = taskpool.evaluate(per_task)
    assert set(metrics) >= {f"test/{t}/acc" for t in TASKS}
    with pytest.raises(FusionBenchError, match="per-task models"):
        taskpool.evaluate({"mnist": per_task["mnist"]})


def test_fast_dev_run_one_batch(pool, tiny_datasets):
    tp = CLIPClassificationTaskPool(
        tasks=["mnist"], datasets=tiny_datasets, batch_size=5, fast_dev_run=True
    )
    metrics = tp.evaluate(pool.classifier(pool.build_encoder()))
    assert metrics["test/mnist/acc"] * 5 == pytest.approx(round(metrics["test/mnist/acc"] * 5))


def test_bad_configuration():
    with pytest.raises(FusionBenchError, match="Unknown split"):
        CLIPClassificationTaskPool(tasks=["mnist"], splits=["val"])
    with pytest.raises(FusionBenchError, match="Unknown task 'svhm'"):
        CLIPClassificationTaskPool(tasks=["mnist"], datasets={"svhm": "/x"})
    with pytest.raises(FusionBenchError, match="Unknown task"):
        CLIPClassificationTaskPool(tasks=["mnits"])


def test_missing_dataset_offline_is_clear(pool, tmp_path):
    tp = CLIPClassificationTaskPool(tasks=["dtd"], datasets={"dtd": str(tmp_path / "absent")})
    with pytest.raises(FusionBenchError, match="does not exist"):
        tp.data.load_split("dtd", "test", tp.max_samples_per_task)
    tp = CLIPClassificationTaskPool(tasks=["dtd"], datasets={"dtd": "someone/not-cached-xyz"})
    with pytest.raises(FusionBenchError, match="taskpool.datasets.dtd"):
        tp.data.load_split("dtd", "test", tp.max_samples_per_task)
