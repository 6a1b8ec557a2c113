"""AdaMerging step time and peak memory on CPU: tiny8 and a synthetic ViT-B/32 pool (8 experts).

Each configuration runs in a fresh process (``child``), which builds the pool, runs
``AdaMerging(max_steps=--steps).merge(pool, data, context)`` exactly as the runner does (CPU Fabric) and prints
JSON: step times (from the method's ``tta/step_s`` history; the first step is reported apart, it
pays one-off allocations), setup time (pool → task vectors, heads, data), peak RSS of the process
and the estimate ``(models_held(N) + 1) · P · 4 B`` that ``dry_run`` prints.

- ``tiny8``: the embedded benchmark (``modelpool=tiny8 suite=tiny8``), its real test images.
- ``b32``: ``benchmarks/pools.py``'s synthetic ``openai/clip-vit-base-patch32``-shaped pool
  (random CLIPModel, experts = θ0 + low-rank update + noise), 8 experts named after 8 task specs,
  random 64×64 test images (resized to 224 by the CLIP transform) and random zero-shot heads
  (building real ones would run the b32 text tower over every class × template on CPU; their
  cache key is changed so no real cache entry is touched).

Run: ``.venv/bin/python benchmarks/adamerging_step.py [--pools tiny8 b32] [--steps 3]``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
B32_TASKS = ["eurosat", "mnist", "gtsrb", "dtd", "resisc45", "cifar10", "stl10", "fashion_mnist"]


def tiny8_pool():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from fusion_bench.paths import config_dir, resolve_path

    if not Path(resolve_path("fusion_bench:tiny8/pretrained.safetensors")).is_file():
        return None, None
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        cfg = compose("config", overrides=["modelpool=tiny8", "suite=tiny8"])
    return instantiate(cfg.modelpool, _convert_="all"), None  # datasets: the task specs' own


def b32_pool(tmp: Path):
    import datasets
    import numpy as np
    import torch
    from PIL import Image

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from pools import build_pool, expert_dir

    from fusion_bench.modelpool.clip_vision import CLIPVisionModelPool
    from fusion_bench.taskpool.tasks import get_task_spec

    class RandomHeadPool(CLIPVisionModelPool):
        def classifier(self, encoder):
            c = super().classifier(encoder)

            def head(classnames, templates, device):  # (D, C), unit columns
                g = torch.Generator().manual_seed(len(classnames))
                h = torch.randn(self.projection_dim, len(classnames), generator=g)
                return (h / h.norm(dim=0)).to(device)

            return dataclasses.replace(
                c, zero_shot_head=head, head_cache_key=c.head_cache_key + "-bench-random-heads"
            )

        @property
        def projection_dim(self) -> int:
            return self._pretrained_extras[0].shape[0]

    pool_dir = build_pool("b32", 8)
    rng = np.random.default_rng(0)
    overrides = {}
    for task in B32_TASKS:
        spec = get_task_spec(task)
        out = tmp / task
        out.mkdir()
        images = [
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(32)
        ]
        features = datasets.Features(
            {spec.image_column: datasets.Image(), spec.label_column: datasets.Value("int64")}
        )
        ds = datasets.Dataset.from_dict(
            {spec.image_column: images, spec.label_column: [0] * len(images)}, features=features
        )
        ds.to_parquet(str(out / f"{spec.test_split}.parquet"))
        overrides[task] = str(out)
    experts = {t: str(expert_dir(pool_dir, i)) for i, t in enumerate(B32_TASKS)}
    return RandomHeadPool(str(pool_dir / "pretrained"), experts), overrides


class AnonPeak:
    """Peak anonymous RSS (RssAnon, sampled every 20 ms): unlike ru_maxrss it leaves out the
    memory-mapped checkpoint pages that lazy reads touch (clean, reclaimable page cache)."""

    def __init__(self):
        import threading

        self.peak, self.running = 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self):
        while self.running:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak = max(self.peak, int(line.split()[1]) * 1024)
            time.sleep(0.02)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return self.peak


class CpuClock(list):
    """The method's history list, stamping each step record with the process CPU time since the
    previous record (user + system, all threads): a step's cost without the wait for a busy CPU."""

    def append(self, record):
        now = time.process_time()
        record["cpu_s"] = now - getattr(self, "last", now)
        self.last = now
        super().append(record)


def child(args) -> None:
    import torch

    from fusion_bench.method.adamerging import AdaMerging
    from fusion_bench.method.base import Context
    from fusion_bench.taskpool.data import TaskData

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        pool, overrides = tiny8_pool() if args.pool == "tiny8" else b32_pool(Path(tmp))
        if pool is None:
            print(json.dumps({"skipped": "tiny8 checkpoints not built yet"}))
            return
        method = AdaMerging(
            granularity=args.granularity,
            max_steps=args.steps,
            batch_size=args.batch_size,
            task_vector_dtype=args.dtype,
            save_weights=None,
            log_every=10**9,
        )
        object.__setattr__(method, "history", CpuClock())  # a frozen dataclass: swap the list
        anon = AnonPeak()
        time.sleep(0.1)
        anon_start = anon.peak  # imports, pool, data files: before the method holds anything
        start = time.perf_counter()
        method.merge(pool, TaskData(datasets=overrides), Context())
        total = time.perf_counter() - start
        anon_peak = anon.stop()
    steps = [r["tta/step_s"] for r in method.history]
    cpu = [r["cpu_s"] for r in method.history[1:]] or [float("nan")]
    n, params = len(pool.expert_names), pool.pretrained().num_parameters()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(
        json.dumps(
            {
                "pool": args.pool,
                "params_m": params / 1e6,
                "experts": n,
                "granularity": args.granularity,
                "dtype": args.dtype,
                "batch": args.batch_size,
                "threads": args.threads,
                "first_step_s": steps[0],
                "step_s": statistics.median(steps[1:] or steps),
                "cpu_step_s": statistics.median(cpu),
                "setup_s": total - sum(steps),
                "peak_rss_gib": peak / 2**30,
                "peak_anon_gib": anon_peak / 2**30,
                "start_anon_gib": anon_start / 2**30,
                "estimate_gib": (method.models_held(n) + 1) * params * 4 / 2**30,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="table", choices=["table", "child"])
    parser.add_argument("--pools", nargs="+", default=["tiny8", "b32"])
    parser.add_argument("--pool", default="tiny8")
    parser.add_argument("--granularity", default="layer")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=0, help="0: 16 for tiny8, 2 for b32")
    parser.add_argument("--threads", type=int, default=1)  # the CPU is shared: 1 thread is stable
    args = parser.parse_args()
    if args.mode == "child":
        return child(args)
    print(
        "| pool | params | N | λ | τ dtype | batch/task | step wall (s) | step CPU (s) | "
        "first step (s) | setup (s) | peak RSS (GiB) | peak anon (GiB) | anon before run (GiB) | "
        "dry_run estimate (GiB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for pool in args.pools:
        for dtype in args.dtypes:
            batch = args.batch_size or (16 if pool == "tiny8" else 2)
            cmd = [
                sys.executable,
                __file__,
                "child",
                "--pool",
                pool,
                "--dtype",
                dtype,
                "--granularity",
                args.granularity,
                "--steps",
                str(args.steps),
                "--batch-size",
                str(batch),
                "--threads",
                str(args.threads),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                print(f"| {pool} | failed: {done.stderr.strip().splitlines()[-1]} |")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            if "skipped" in r:
                print(f"| {pool} | skipped: {r['skipped']} |")
                break
            print(
                f"| {pool} | {r['params_m']:.1f}M | {r['experts']} | {r['granularity']} | "
                f"{r['dtype']} | {r['batch']} | {r['step_s']:.2f} | {r['cpu_step_s']:.2f} | "
                f"{r['first_step_s']:.2f} | {r['setup_s']:.1f} | {r['peak_rss_gib']:.2f} | "
                f"{r['peak_anon_gib']:.2f} | {r['start_anon_gib']:.2f} | "
                f"{r['estimate_gib']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
