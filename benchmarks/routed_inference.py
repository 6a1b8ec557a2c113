"""Inference cost of routed models against one merged model, on the same batches, in one run.

For each routed method a fresh process builds, on the default pool (tiny8, or any
``--modelpool``/``--suite`` of conf/), the method's routed model and task arithmetic's merged
tower (λ = 0.3, the single-model baseline), then times forward passes of both on the same
preprocessed test images of every task (batch ``--batch-size``): the merged tower, the routed model
task-agnostic (router decides) and with the oracle task id. Reported: images/s, the ratio to the
merged tower measured in the same process, build time, the stored-parameter factor, and the
process's peak RSS. Per-task methods (EMR, TALL masks) serve each task with one ordinary tower, so
their inference cost is the merged model's; they are not timed here.

    python benchmarks/routed_inference.py                                    # every routed/* method
    python benchmarks/routed_inference.py --methods routed/mass routed/smile --repeats 5
    python benchmarks/routed_inference.py --methods routed/wemoe --set routed/wemoe:max_steps=20

The last stdout line is JSON (all rows); a markdown table is printed above it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PER_TASK = {"routed/emr_merging", "routed/tall_masks"}  # task id picks a plain tower
NOT_BUILT = {"routed/checkpoint"}  # evaluates a saved model: nothing to build


def routed_methods() -> list[str]:
    folder = ROOT / "conf" / "method" / "routed"
    names = sorted(f"routed/{p.stem}" for p in folder.glob("*.yaml"))
    return [n for n in names if n not in PER_TASK | NOT_BUILT]


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def measure(method: str, options: dict, args) -> dict:
    """One method, in this process: build, then time merged vs routed on the same batches."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from fusion_bench.api import build_method
    from fusion_bench.method.base import Context, pool_experts
    from fusion_bench.method.task_arithmetic import TaskArithmetic
    from fusion_bench.paths import config_dir

    torch.manual_seed(0)
    with initialize_config_dir(str(config_dir()), version_base=None):
        overrides = ["logger=none", f"modelpool={args.modelpool}", f"suite={args.suite}"]
        cfg = compose("config", overrides=overrides)
    pool = instantiate(cfg.modelpool, _convert_="all")
    taskpool = instantiate(cfg.taskpool, _convert_="all")
    instance, _ = build_method(method, options)
    t = time.perf_counter()
    routed = instance.build(pool, taskpool.data, Context()).eval()
    build_s = time.perf_counter() - t
    merged = TaskArithmetic(scaling_factor=0.3).merge(pool.pretrained(), pool_experts(pool))
    classifier = pool.classifier(pool.build_encoder(merged))
    batches = []  # (task, images): the same preprocessed batches for every model
    for task in taskpool.tasks:
        for images in taskpool.data.images(
            task, "test", classifier.preprocess, args.images_per_task, args.batch_size
        ):
            batches.append((task, images))
    n_images = sum(len(images) for _, images in batches)

    names = set(routed.expert_names)
    forwards = {  # timed interleaved, best of the repeats: load drift hits all three alike
        "merged": lambda task, images: classifier.features(classifier.encoder, images),
        "routed": lambda task, images: routed(images),
        "oracle": lambda task, images: routed(images, task=task if task in names else None),
    }
    best = dict.fromkeys(forwards, float("inf"))
    with torch.no_grad():
        for forward in forwards.values():  # warm-up (routed caches, allocator)
            forward(*batches[0])
        for _ in range(args.repeats):
            for label, forward in forwards.items():
                t0 = time.perf_counter()
                for task, images in batches:
                    forward(task, images)
                best[label] = min(best[label], time.perf_counter() - t0)
    merged_rate, agnostic_rate, oracle_rate = (n_images / best[k] for k in forwards)
    pretrained = pool.pretrained().num_parameters()
    return {
        "method": method,
        "options": options,
        "images": n_images,
        "batch_size": args.batch_size,
        "build_s": build_s,
        "merged_images_per_s": merged_rate,
        "routed_images_per_s": agnostic_rate,
        "oracle_images_per_s": oracle_rate,
        "routed_vs_merged": agnostic_rate / merged_rate,
        "oracle_vs_merged": oracle_rate / merged_rate,
        "storage_vs_pretrained": routed.stored_parameters() / pretrained,
        "forward_passes_per_image": 1 + routed.extra_forward_passes,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=None, help="default: every routed/*")
    parser.add_argument(
        "--set", nargs="*", default=[], help="method:option=value (JSON value), repeatable"
    )
    parser.add_argument("--modelpool", default="tiny8")
    parser.add_argument("--suite", default="tiny8")
    parser.add_argument("--images-per-task", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timed passes")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, json.loads(args.options), args)))
        return
    options: dict[str, dict] = {}
    for item in args.set:
        method, _, assignment = item.partition(":")
        key, _, value = assignment.partition("=")
        options.setdefault(method, {})[key] = parse_value(value)
    rows = []
    for method in args.methods or routed_methods():
        command = [
            sys.executable,
            __file__,
            "--one",
            method,
            "--options",
            json.dumps(options.get(method, {})),
            "--modelpool",
            args.modelpool,
            "--suite",
            args.suite,
            "--images-per-task",
            str(args.images_per_task),
            "--batch-size",
            str(args.batch_size),
            "--repeats",
            str(args.repeats),
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
        if done.returncode != 0:
            print(f"{method}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  {method}: done", file=sys.stderr)
    print(
        f"Machine: {os.cpu_count()} CPUs, Python {platform.python_version()}; pool "
        f"{args.modelpool}, {args.images_per_task} test images per task, batch {args.batch_size}, "
        f"best of {args.repeats}.\n"
    )
    print(
        "| method | merged (img/s) | routed, task-agnostic (img/s) | × merged | oracle task id "
        "(img/s) | × merged | passes | stored vs pretrained | build (s) | peak RSS (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['merged_images_per_s']:.0f} | {r['routed_images_per_s']:.0f} | "
            f"{r['routed_vs_merged']:.2f} | {r['oracle_images_per_s']:.0f} | "
            f"{r['oracle_vs_merged']:.2f} | {r['forward_passes_per_image']} | "
            f"{r['storage_vs_pretrained']:.2f}× | {r['build_s']:.1f} | {r['peak_rss_mib']:.0f} |"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
