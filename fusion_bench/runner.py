"""The runner: one function, read top-down.

seed → Fabric → model pool, method, task pool (a log line each) → merge → evaluate → table,
logger, merged model, JSON report.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fusion_bench.checkpoint import (
    check_writable,
    ordinary_mode,
    remove_stale_temporaries,
    write_atomically,
)
from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import (
    KIND_GIVES,
    STATE_DICT_KINDS,
    Context,
    build_classifiers,
    evaluate_classifiers,
    merged_classifier,
    pool_adapters,
)
from fusion_bench.report import read_report
from fusion_bench.sequence import arrival_order, run_sequence, summarize, write_plot
from fusion_bench.tensor_ops import check_same_architecture

log = logging.getLogger("fusion_bench")
PACKAGES = (
    "fusion_bench",
    "torch",
    "open_clip_torch",
    "transformers",
    "lightning",
    "hydra-core",
    "datasets",
    "safetensors",
    "wandb",
)


def run(cfg: DictConfig) -> dict:
    """Run one job described by the composed config; returns the report."""
    timings: dict[str, float] = {}
    method_name = cfg.get("method_name") or "method"

    if cfg.dry_run:
        return dry_run(cfg)
    finished = finished_sweep_job(cfg)
    if finished is not None:  # a resumed sweep: this job's report is complete
        log.info("job already finished (%s): skipped", cfg.report_save_path)
        print(f"{method_name}: already finished in an earlier run of this sweep, skipped")
        return finished
    refuse_to_overwrite(cfg)

    # 1. seed and Fabric (device, precision, loggers)
    from lightning.fabric import seed_everything

    seed_everything(cfg.seed, verbose=False)
    loggers = [instantiate(cfg.logger)] if cfg.get("logger") else []
    # _convert_: a plain list, or Fabric wraps the ListConfig as one "logger" and log_dict breaks
    fabric = instantiate(cfg.fabric, loggers=loggers, _convert_="all")
    fabric.launch()  # no-op on one device; starts the other processes when fabric.devices > 1
    log.info("fabric: %s, precision %s", fabric.device, cfg.fabric.get("precision"))

    with closing(loggers):  # loggers are finalised even when the job fails
        # 2. the three parts
        t = time.perf_counter()
        modelpool = instantiate(cfg.modelpool, _convert_="all")
        log.info(
            "model pool: %s, %d experts %s",
            type(modelpool).__name__,
            len(modelpool.expert_names),
            modelpool.expert_names,
        )
        method = instantiate(cfg.method, _convert_="all")
        log.info("method: %s (%s, kind %s)", method_name, type(method).__name__, method.kind)
        taskpool = instantiate(cfg.taskpool, _convert_="all")
        log.info(
            "task pool: %s, tasks %s, splits %s",
            type(taskpool).__name__,
            taskpool.tasks,
            taskpool.splits,
        )
        validate_pool(modelpool, method)
        preflight(cfg, taskpool)
        if cfg.merged_model_save_path and method.kind not in (*STATE_DICT_KINDS, "routed"):
            raise FusionBenchError(
                f"Method '{method_name}' gives {KIND_GIVES[method.kind]}, not one merged model: "
                "merged_model_save_path applies only to merging and routed methods. Remove it "
                "from the command."
            )
        timings["load_s"] = time.perf_counter() - t

        sequence = cfg.get("sequence") or {}
        if method.kind == "sequential":  # the arrival order, checked before any work
            order = arrival_order(
                modelpool.expert_names, sequence.get("order"), sequence.get("shuffle_seed")
            )
            log.info("sequence: %s", order)

        # 3. merge: what the method gives depends on its kind (see fusion_bench.method.base)
        t = time.perf_counter()
        context = Context(fabric, output_dir(cfg), bool(cfg.fast_dev_run))
        if method.kind == "sequential":  # the sequential protocol: evaluated after each expert
            merged, step_metrics = run_sequence(
                method,
                modelpool,
                taskpool,
                fabric,
                order,
                bool(sequence.get("evaluate_every_step", True)),
                step_saver(cfg, modelpool, fabric) if sequence.get("save_every_step") else None,
                lambda line: print(line) if fabric.is_global_zero else None,
                lambda metrics, step: [lg.log_metrics(metrics, step=step) for lg in loggers],
                context,
            )
            model = merged_classifier(modelpool, merged)
        else:
            model, merged = build_classifiers(
                method, modelpool, taskpool.data, context, method_name
            )
        timings["merge_s"] = time.perf_counter() - t
        log.info("merged in %.2f s", timings["merge_s"])

        # 4. evaluate
        t = time.perf_counter()
        metrics = evaluate_classifiers(model, taskpool, fabric)
        timings["evaluate_s"] = time.perf_counter() - t
        # With several processes (fabric.devices > 1) every rank evaluates the same merged model;
        # only rank 0 prints, saves and writes the report (Lightning loggers are rank-0 only).
        outputs = fabric.is_global_zero
        continual = None
        if method.kind == "sequential":
            continual = continual_summary(
                order, step_metrics, metrics, taskpool, fabric, model, sequence, loggers
            )
        if outputs:
            print(evaluation_table(metrics, taskpool, method_name, method.kind))
            if cfg.fast_dev_run:
                print(
                    "fast_dev_run: one batch per task (≤ 16 images) and one adaptation step — "
                    "not a result"
                )
            if continual and "bwt" in continual:
                for split in taskpool.splits:
                    print(
                        f"continual ({split}): final average {100 * continual['final_avg_acc'][split]:.2f}%"
                        f", backward transfer {100 * continual['bwt'][split]:+.2f} points"
                    )

        # 5. outputs
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
            logger.log_metrics(metrics)
            if hasattr(logger, "log_table"):  # W&B: one row per task, as a table in the run
                for split in taskpool.splits:
                    rows = [
                        [task, metrics[f"{split}/{task}/acc"], metrics[f"{split}/{task}/loss"]]
                        for task in taskpool.tasks
                    ]
                    logger.log_table(
                        key=f"{split}/per_task", columns=["task", "acc", "loss"], data=rows
                    )
        report = {
            "method": method_name,
            "overrides": hydra_overrides(),
            "config": OmegaConf.to_container(cfg, resolve=True),
            "metrics": metrics,
            **({"continual": continual} if continual else {}),
            "evaluation": EVALUATION_MODES.get(method.kind, EVALUATION_MODES["merge"]),
            **({"costs": costs(method, model, modelpool)} if method.kind in COSTED else {}),
            "fast_dev_run": bool(cfg.fast_dev_run),
            "timings": timings,
            "memory": peak_memory(),
            "modelpool": modelpool.describe(),
            "environment": environment(),
        }
        if continual and "steps" in continual and outputs and output_dir(cfg) is not None:
            plot = write_plot(continual, taskpool.splits, output_dir(cfg) / "continual.svg")
            log.info("accuracy vs step: %s", plot)
        for logger in loggers:  # time and memory next to the metrics
            logger.log_metrics(
                {f"time/{k}": v for k, v in timings.items()}
                | {f"memory/{k}": v for k, v in report["memory"].items()}
            )
        # The report first: what was measured is kept even if saving the model fails.
        write_report(cfg, report, outputs)
        if cfg.merged_model_save_path and outputs:
            try:
                if method.kind == "routed":
                    save_routed(model.model, method, modelpool, cfg, metrics)
                else:
                    save_merged(modelpool, merged, Path(cfg.merged_model_save_path), cfg, metrics)
            except (OSError, FusionBenchError) as e:
                report["save_error"] = str(e)
                write_report(cfg, report, outputs)
                raise FusionBenchError(
                    f"Saving the merged model to '{cfg.merged_model_save_path}' failed ({e}). "
                    f"The metrics are kept in {cfg.report_save_path or 'the console table'}."
                ) from e
        return report


def objective(cfg: DictConfig, report: dict) -> float | None:
    """The metric a search sweeper maximises (``cfg.objective``). Missing under a search sweeper
    is an error naming the fix; in other runs the job simply returns None."""
    name = cfg.get("objective") or "validation/avg_acc"
    value = report.get("metrics", {}).get(name)
    if value is None and searching():
        raise FusionBenchError(
            f"The sweeper maximises objective '{name}', which this run did not measure: evaluate "
            "that split (taskpool.splits=[validation,test]) or set objective=<a reported metric>."
        )
    return value


def searching() -> bool:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    target = str(HydraConfig.get().sweeper.get("_target_", ""))
    return "Basic" not in target and bool(target)


def write_report(cfg: DictConfig, report: dict, outputs: bool) -> None:
    if cfg.report_save_path and outputs:
        path = Path(cfg.report_save_path)
        text = json.dumps(report, indent=2, default=str)
        write_atomically(path, lambda tmp: tmp.write_text(text))
        log.info("report: %s", path)


def preflight(cfg: DictConfig, taskpool) -> None:
    """Everything that can fail after the merge, checked before it: output directories are
    writable, the head cache is writable, every evaluated dataset loads."""
    if cfg.get("merged_model_save_path"):
        check_writable(
            Path(cfg.merged_model_save_path).parent,
            "the merged model",
            "Choose another merged_model_save_path.",
        )
    if cfg.get("report_save_path"):
        check_writable(
            Path(cfg.report_save_path).parent, "the report", "Choose another report_save_path."
        )
    if taskpool.data.cache_heads:
        from fusion_bench.paths import cache_dir

        check_writable(
            cache_dir() / "heads",
            "the zero-shot head cache",
            "Set FUSION_BENCH_CACHE to a writable directory, or taskpool.cache_heads=false.",
        )
    for task in taskpool.tasks:  # memory-mapped Arrow files: cheap, and read again when evaluated
        for split in taskpool.splits:
            taskpool.data.load_split(task, split)


@contextlib.contextmanager
def closing(loggers: list):
    """Finalise the loggers (and end the W&B run, so that the next job in this process starts
    its own instead of appending to this one), whether the job succeeds or fails."""
    status = "failed"
    try:
        yield
        status = "success"
    finally:
        for logger in loggers:
            logger.finalize(status)
            # `_experiment`, not `experiment`: the property would start a W&B run just to end it
            finish = getattr(getattr(logger, "_experiment", None), "finish", None)
            if callable(finish):
                finish(exit_code=0 if status == "success" else 1)


def hydra_overrides() -> list[str]:
    """The command-line overrides of this job (what distinguishes it within a sweep)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def validate_pool(modelpool, method=None) -> None:
    """Every expert has the pretrained model's keys and shapes (headers only, nothing loaded), and
    there is an expert to merge (unless the method is the zero-shot baseline)."""
    if not modelpool.expert_names and getattr(method, "needs_experts", True):
        option = getattr(modelpool, "experts_option", "modelpool.finetuned")
        raise FusionBenchError(
            f"The model pool has no fine-tuned expert ({option} is empty): there is "
            "nothing to merge. Add experts, or run method=pretrained for the zero-shot model."
        )
    if not getattr(modelpool, "shared_init", True):  # independently trained models: no θ0
        modelpool.check_members()
        return
    pretrained = modelpool.pretrained()
    for name in modelpool.expert_names:
        check_same_architecture(pretrained, modelpool.expert(name), name)
    if getattr(method, "kind", None) == "lora_merge":  # a LoRA pool; every adapter's header read
        pool_adapters(modelpool, type(method).__name__)


def continual_summary(order, step_metrics, metrics, taskpool, fabric, model, sequence, loggers):
    """The sequential protocol's report: per step, final average and BWT over the seen tasks."""
    if not sequence.get("evaluate_every_step", True):
        return {"order": list(order)}
    seen = [task for task in order if task in taskpool.tasks]
    if set(seen) == set(taskpool.tasks):
        last = metrics  # the final evaluation covers exactly the seen tasks
    else:
        last = taskpool.evaluate(model, fabric, tasks=seen) if seen else {}
    summary = summarize(order, [*step_metrics, last], taskpool.splits)
    final = {f"continual/{k}": v for k, v in last.items()}
    final |= {f"continual/{split}/bwt": v for split, v in summary["bwt"].items()}
    for logger in loggers:
        logger.log_metrics(final, step=len(order))
    return summary


def step_saver(cfg: DictConfig, modelpool, fabric):
    """Writes each step's merged model to <run dir>/steps/<step>-<expert> (rank 0)."""
    root = output_dir(cfg)
    if root is None:
        raise FusionBenchError(
            "sequence.save_every_step needs a run directory (run it from the CLI)."
        )

    def save(step: int, name: str, state) -> None:
        if fabric.is_global_zero:
            path = root / "steps" / f"{step}-{name}"
            path.mkdir(parents=True, exist_ok=True)
            modelpool.save({k: state[k] for k in state}, path, f"# Step {step}: + {name}\n")

    return save


def output_dir(cfg: DictConfig) -> Path | None:
    """The job's output directory (Hydra's), where methods may write their own artefacts."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


def finished_sweep_job(cfg: DictConfig) -> dict | None:
    """In a sweep re-run into the same directory (``hydra.sweep.dir=<it>``), a job whose report
    is complete is skipped, so an interrupted sweep resumes where it stopped (``overwrite=true``
    re-runs every job)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if cfg.get("overwrite") or not cfg.get("report_save_path") or not HydraConfig.initialized():
        return None
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    report = read_report(Path(cfg.report_save_path))  # None: missing or unreadable, run the job
    return report if report is not None and "metrics" in report else None


def refuse_to_overwrite(cfg: DictConfig) -> None:
    """Fail before any work if an output would overwrite something the user has."""
    if cfg.get("overwrite"):
        return
    model_path = cfg.get("merged_model_save_path")
    if (
        model_path
        and Path(model_path).exists()
        and any(Path(model_path).iterdir() if Path(model_path).is_dir() else [True])
    ):
        raise FusionBenchError(
            f"merged_model_save_path '{model_path}' exists and is not empty. Choose another path, "
            "or pass overwrite=true to replace it."
        )
    report_path = cfg.get("report_save_path")
    # a leftover empty or truncated report (a crash while writing it) is replaced, not refused
    if report_path and read_report(Path(report_path)) is not None:
        raise FusionBenchError(
            f"report_save_path '{report_path}' exists. Choose another path, or pass "
            "overwrite=true to replace it."
        )


def save_merged(modelpool, state, path: Path, cfg: DictConfig, metrics: dict) -> None:
    """``state``: a merged state dict (run() refuses merged_model_save_path for the kinds that
    give none, before any work)."""
    card = model_card(cfg, modelpool, metrics)
    save_directory(path, cfg, lambda tmp: modelpool.save({k: state[k] for k in state}, tmp, card))
    log.info("merged model saved to %s", path)


def save_routed(routed, method, modelpool, cfg: DictConfig, metrics: dict) -> None:
    """A routed model as a directory (docs/routed.md: config.json + model.safetensors + card)."""
    from fusion_bench.method.routed.checkpoint import write_routed

    path = Path(cfg.merged_model_save_path)
    card = routed_card(cfg, metrics)
    save_directory(path, cfg, lambda tmp: write_routed(routed, method, modelpool, tmp, card))
    log.info("routed model saved to %s", path)


def save_directory(path: Path, cfg: DictConfig, write) -> None:
    """``write(tmp_dir)`` fills a directory next to ``path`` under a temporary name, which is then
    renamed: a failure (full disk, kill) never leaves a half-written model at the path."""
    remove_stale_temporaries(path)  # left by a killed run (a model directory each: GBs)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        for file in tmp.rglob("*"):
            if file.is_file():
                os.chmod(file, ordinary_mode())
        if path.exists() and (path.is_file() or any(path.iterdir())):
            if not cfg.get("overwrite"):  # appeared while this run worked (another run?)
                kept = path.with_name(f"{path.name}.{os.getpid()}")
                os.replace(tmp, kept)
                raise FusionBenchError(
                    f"'{path}' was created while this run worked (another run?); this run's "
                    f"model is kept at '{kept}'."
                )
            old = path.with_name(f".{path.name}.replaced-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            if path.exists():
                path.rmdir()  # an empty directory
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def routed_card(cfg: DictConfig, metrics: dict) -> str:
    method = OmegaConf.to_yaml(cfg.method, resolve=True)
    results = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items() if k.endswith("acc"))
    return (
        f"# Routed model ({cfg.get('method_name')})\n\nWritten by fusion_bench: config.json (the "
        "method and its hyper-parameters, the experts) and model.safetensors (everything the "
        "routed model stores). Format: docs/routed.md.\n\n"
        f"## Method and hyper-parameters\n\n```yaml\n{method}```\n\n"
        f"## Accuracy\n\n| metric | value |\n|---|---|\n{results}\n\n## Use it\n\n"
        "Evaluate it again (the model pool gives the text tower and the zero-shot heads):\n\n"
        f"```bash\nfusion_bench method=routed/checkpoint method.path={cfg.merged_model_save_path} "
        f"modelpool={choice('modelpool')} suite={choice('suite')}\n```\n"
    )


def model_card(cfg: DictConfig, modelpool, metrics: dict) -> str:
    method = OmegaConf.to_yaml(cfg.method, resolve=True)
    inputs = json.dumps(modelpool.describe(), indent=2)
    results = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items() if k.endswith("acc"))
    return (
        f"# Merged model ({cfg.get('method_name')})\n\nWritten by fusion_bench.\n\n"
        f"## Method and hyper-parameters\n\n```yaml\n{method}```\n\n"
        f"## Inputs\n\n```json\n{inputs}\n```\n\n## Accuracy\n\n| metric | value |\n|---|---|\n"
        f"{results}\n\n## Use it\n\nEvaluate it again (with the same model pool, which gives the "
        "text tower and the zero-shot heads):\n\n```bash\n"
        f"fusion_bench method=checkpoint method.path={cfg.merged_model_save_path} "
        f"modelpool={choice('modelpool')} suite={choice('suite')}\n```\n\n"
        "Load it in Python: `fusion_bench.api.load(path, 'merged')` gives the image tower's state "
        "dict (a Hugging Face pool's directory also loads with "
        "`transformers.CLIPVisionModel.from_pretrained(path)`).\n"
    )


def choice(group: str) -> str:
    """The config option chosen for ``group`` in this run (``<...>`` outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return str(HydraConfig.get().runtime.choices.get(group, f"<{group}>"))
    return f"<{group}>"


def dry_run(cfg: DictConfig) -> dict:
    """Print the resolved config and a memory estimate from checkpoint headers; load nothing."""
    print(OmegaConf.to_yaml(cfg, resolve=True))
    modelpool = instantiate(cfg.modelpool, _convert_="all")
    method = instantiate(cfg.method, _convert_="all")
    reference = (
        modelpool.pretrained()
        if getattr(modelpool, "shared_init", True)
        else modelpool.expert(modelpool.expert_names[0])
    )
    num_params = reference.num_parameters()
    n = len(modelpool.expert_names)
    held = method.models_held(n)
    gib = (held + 1.0) * num_params * 4 / 2**30  # + the model being evaluated
    estimate = {
        "num_parameters": num_params,
        "num_experts": n,
        "models_held": held,
        "estimated_peak_gib": round(gib, 3),
    }
    print(
        f"memory estimate: image tower {num_params / 1e6:.1f}M params; the method holds ~{held:g} "
        f"model(s) + the evaluated one in fp32 ≈ {gib:.2f} GiB (+ data batches)"
    )
    return {"dry_run": True, "memory_estimate": estimate}


EVALUATION_MODES = {
    "merge": "one model for every task (no task id)",
    "per_task": "oracle task id: each task's images go to that task's model",
    "routed": "task-agnostic: the router decides (headline); also oracle task id (oracle/*)",
    "ensemble": "all experts on every image (no task id)",
}


def evaluation_table(metrics: dict[str, float], taskpool, title: str, kind: str) -> str:
    """The console table; its title says how the tasks were told apart (evaluation mode)."""
    splits = taskpool.splits
    if kind == "routed":
        columns = [
            (f"{s} {label}", f"{prefix}{s}")
            for s in splits
            for label, prefix in (("acc", ""), ("routing", "routing/"), ("oracle", "oracle/"))
        ]
    else:
        columns = [(f"{s} acc", s) for s in splits]
    table = format_table(metrics, taskpool.tasks, columns, title)
    if kind not in ("routed", "per_task"):
        return table
    first, rest = table.split("\n", 1)
    mode = {
        "routed": "acc: task-agnostic (the router decides); routing: share of a task's images "
        "routed to its own expert; oracle: acc with the task id given",
        "per_task": "oracle task id: each task is evaluated on its own model",
    }[kind]
    return f"{first}\n{mode}\n{rest}"


def format_table(
    metrics: dict[str, float],
    tasks: list[str],
    columns: list[tuple[str, str]] | list[str],
    title: str,
) -> str:
    """``columns``: (header, metric prefix) pairs, or split names (header '<split> acc');
    a metric the run does not have shows as '-'."""
    columns = [(f"{c} acc", c) if isinstance(c, str) else c for c in columns]
    width = max(len(t) for t in [*tasks, "average"]) + 2
    header = "task".ljust(width) + "".join(f"{h:>16}" for h, _ in columns)

    def cell(key: str) -> str:
        return f"{100 * metrics[key]:>15.2f}%" if key in metrics else f"{'-':>16}"

    lines = [f"== {title} ==", header, "-" * len(header)]
    for task in tasks:
        lines.append(task.ljust(width) + "".join(cell(f"{p}/{task}/acc") for _, p in columns))
    lines.append("-" * len(header))
    lines.append("average".ljust(width) + "".join(cell(f"{p}/avg_acc") for _, p in columns))
    return "\n".join(lines)


COSTED = ("per_task", "routed")


def costs(method, model, modelpool) -> dict:
    """What a per-task or routed method stores and runs, relative to one pretrained image tower
    (the report's ``costs``; inference throughput is measured by benchmarks/routed_inference.py)."""
    pretrained = modelpool.pretrained().num_parameters()  # the image tower
    if method.kind == "routed":
        stored = model.model.stored_parameters()
        passes = 1 + model.model.extra_forward_passes
    else:
        stored = round(method.stored_models(len(modelpool.expert_names)) * pretrained)
        passes = 1
    return {
        "stored_parameters": stored,
        "pretrained_parameters": pretrained,
        "storage_vs_pretrained": stored / pretrained,
        "forward_passes_per_image": passes,
    }


def peak_memory() -> dict[str, float]:
    # ru_maxrss is in KiB on Linux (bytes on macOS)
    scale = 1 if platform.system() == "Darwin" else 1024
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20}
    if torch.cuda.is_available():
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def environment() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    try:
        revision = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                cwd=Path(__file__).parent,
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        revision = None
    return {"python": platform.python_version(), "packages": versions, "git_revision": revision}
