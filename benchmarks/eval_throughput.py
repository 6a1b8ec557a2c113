"""Evaluation throughput on CPU: images/s of a pool's zero-shot classifier, preprocessing included.

Uses the real evaluation path: ``CLIPVisionModelPool.classifier`` + ``CLIPClassificationTaskPool``
(``datasets.load_dataset`` on a local parquet dataset, the pool's PIL preprocess, DataLoader,
forward, logits) on the ``eurosat`` task spec (10 classes, 3 templates) with random RGB images
written once under ``$FUSION_BENCH_CACHE/bench/eval_data``. Also times the zero-shot head built
from the text tower (cache miss) against reading it back from the on-disk head cache (hit), and
the preprocessing + loading alone (no model) to show how the time splits.

The last stdout line is JSON. Run: ``python benchmarks/eval_throughput.py <pool dir>``
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

TASK = "eurosat"


def write_images(directory: Path, n: int, size: int, seed: int = 0) -> Path:
    """A ``test.parquet`` of ``n`` random ``size``×``size`` RGB images (PNG) with 10 labels."""
    if (directory / "test.parquet").is_file():
        return directory
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}
    )
    images = [
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)
    ]
    ds = datasets.Dataset.from_dict(
        {"image": images, "label": [i % 10 for i in range(n)]}, features=features
    )
    tmp = directory / "test.parquet.tmp"
    ds.to_parquet(str(tmp))
    os.replace(tmp, directory / "test.parquet")
    return directory


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pool", type=Path)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--data-root", type=Path, required=True)
    args = parser.parse_args(argv)

    import torch

    from fusion_bench.modelpool.clip_vision import CLIPVisionModelPool
    from fusion_bench.taskpool.clip_classification import CLIPClassificationTaskPool

    data = write_images(
        args.data_root / f"{args.images}x{args.image_size}", args.images, args.image_size
    )
    pool = CLIPVisionModelPool(
        pretrained=str(args.pool / "pretrained"), finetuned={TASK: str(args.pool / "expert_00")}
    )
    classifier = pool.classifier(pool.build_encoder())
    cpu = torch.device("cpu")
    result: dict = {
        "images": args.images,
        "image_size": args.image_size,
        "torch_threads": torch.get_num_threads(),
    }

    with tempfile.TemporaryDirectory() as cache:  # an empty head cache: the first build misses
        os.environ["FUSION_BENCH_CACHE"] = cache
        taskpool = CLIPClassificationTaskPool(tasks=[TASK], datasets={TASK: str(data)})
        t = time.perf_counter()
        taskpool.data.zero_shot_head(classifier, TASK, cpu)
        result["head_miss_s"] = time.perf_counter() - t
        t = time.perf_counter()
        taskpool.data.zero_shot_head(classifier, TASK, cpu)
        result["head_hit_s"] = time.perf_counter() - t

        ds = taskpool.data.load_split(TASK, "test")  # also warms the datasets cache
        for batch_size in args.batch_sizes:
            taskpool.batch_size = batch_size
            t = time.perf_counter()
            for _ in taskpool.data.loader(ds, TASK, classifier.preprocess, batch_size):
                pass
            pre_s = time.perf_counter() - t
            t = time.perf_counter()
            metrics = taskpool.evaluate(classifier)
            eval_s = time.perf_counter() - t
            assert 0.0 <= metrics[f"test/{TASK}/acc"] <= 1.0
            result[f"batch{batch_size}"] = {
                "evaluate_s": eval_s,
                "images_per_s": args.images / eval_s,
                "preprocess_only_images_per_s": args.images / pre_s,
            }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
