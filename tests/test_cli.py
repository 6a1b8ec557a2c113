"""The CLI end to end through Hydra, on tiny local pools and datasets (in-process for speed,
plus one real subprocess of the console script)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusion_bench.cli import main
from tests.conftest import TASKS
from tests.wandb_records import wait_for_logged


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    from hydra.core.global_hydra import GlobalHydra

    argv, sys.argv = sys.argv, ["fusion_bench", *args]
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
    out, err = capsys.readouterr()
    return code, out, err


def test_run_end_to_end_hf(hf_cli_args, tmp_path, capsys):
    from transformers import CLIPVisionModel

    out_dir = tmp_path / "run"
    code, out, err = run_cli(
        [
            *hf_cli_args,
            "method=task_arithmetic",
            "method.scaling_factor=0.5",
            "logger=wandb",
            f"hydra.run.dir={out_dir}",
            f"merged_model_save_path={tmp_path / 'merged'}",
            "taskpool.splits=[validation,test]",
        ],
        capsys,
    )
    assert code == 0, err
    # console table
    assert "== task_arithmetic ==" in out and "average" in out
    for task in TASKS:
        assert task in out
    # JSON report
    report = json.loads((out_dir / "report.json").read_text())
    assert set(report["timings"]) == {"load_s", "merge_s", "evaluate_s"}
    assert report["memory"]["peak_rss_mib"] > 0
    assert report["environment"]["packages"]["torch"]
    assert report["config"]["method"]["scaling_factor"] == 0.5
    for task in TASKS:
        assert 0.0 <= report["metrics"][f"test/{task}/acc"] <= 1.0
        assert f"validation/{task}/acc" in report["metrics"]
    # W&B offline run with the per-task metrics
    run_files = list(out_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, list(out_dir.rglob("*"))
    logged = wait_for_logged(run_files[0], "test/per_task/nrows")
    for task in TASKS:
        assert logged[f"test/{task}/acc"] == pytest.approx(report["metrics"][f"test/{task}/acc"])
    assert logged["test/avg_acc"] == pytest.approx(report["metrics"]["test/avg_acc"])
    assert logged["time/merge_s"] == pytest.approx(report["timings"]["merge_s"])
    assert logged["memory/peak_rss_mib"] > 0 and report["fast_dev_run"] is False
    assert logged["test/per_task/_type"] == "table-file" and logged["test/per_task/nrows"] == 2
    # merged model: re-loadable with from_pretrained, equal to the merge
    merged = CLIPVisionModel.from_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "README.md").read_text().startswith("# Merged model")
    from fusion_bench.method.base import pool_experts
    from fusion_bench.method.task_arithmetic import TaskArithmetic
    from fusion_bench.modelpool.clip_vision import CLIPVisionModelPool
    from fusion_bench.testing import assert_state_dict_close

    pool = CLIPVisionModelPool(
        report["config"]["modelpool"]["pretrained"], report["config"]["modelpool"]["finetuned"]
    )
    expected = TaskArithmetic(scaling_factor=0.5).merge(pool.pretrained(), pool_experts(pool))
    assert_state_dict_close(merged.state_dict(), expected)


def test_refuses_to_overwrite_outputs(hf_cli_args, tmp_path, capsys):
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "keep.txt").write_text("mine")
    code, _, err = run_cli(
        [
            *hf_cli_args,
            f"hydra.run.dir={tmp_path / 'r'}",
            "logger=none",
            f"merged_model_save_path={tmp_path / 'merged'}",
        ],
        capsys,
    )
    assert code == 2
    assert "exists and is not empty" in err and "overwrite=true" in err
    assert "Traceback" not in err
    assert (tmp_path / "merged" / "keep.txt").read_text() == "mine"


def test_open_clip_individual_and_csv_logger(open_clip_cli_args, tmp_path, capsys):
    code, out, err = run_cli(
        [
            *open_clip_cli_args,
            "method=individual",
            "logger=csv",
            f"hydra.run.dir={tmp_path}",
            "fast_dev_run=true",
        ],
        capsys,
    )
    assert code == 0, err
    assert "== individual ==" in out
    metrics_csv = list(tmp_path.rglob("metrics.csv"))
    assert metrics_csv and "test/avg_acc" in metrics_csv[0].read_text()


def test_multirun_sweep_and_report(hf_cli_args, tmp_path, capsys):
    from fusion_bench.report import main as report_main

    sweep = tmp_path / "sweep"
    code, _, err = run_cli(
        [
            "-m",
            *hf_cli_args,
            "logger=none",
            "method.scaling_factor=0.0,1.0",
            "taskpool.splits=[validation,test]",
            f"hydra.sweep.dir={sweep}",
        ],
        capsys,
    )
    assert code == 0, err
    reports = sorted(sweep.glob("*/report.json"))
    # keyed by job number (and the job's method)
    assert [p.parent.name for p in reports] == ["0-task_arithmetic", "1-task_arithmetic"]
    assert report_main([str(sweep), "--csv", str(tmp_path / "t.csv")]) == 0
    out = capsys.readouterr().out
    assert "Best by validation/avg_acc" in out
    assert "method.scaling_factor=0.0" in out and "method.scaling_factor=1.0" in out
    assert (tmp_path / "t.csv").read_text().startswith("job,setting")
    # an interrupted sweep and a truncated report: said, not a crash or a silent "best"
    (reports[1]).write_text('{"metrics": {"test/avg')
    assert report_main([str(sweep)]) == 0
    err = capsys.readouterr().err
    assert "skipped unreadable report" in err and "1 of the sweep's 2 jobs" in err
    # the same sweep again into its directory: resumed — job 0 (complete) skipped, job 1 (its
    # report truncated) run again, and the sweep is whole
    before = reports[0].stat().st_mtime_ns
    sweep_args = [
        "-m",
        *hf_cli_args,
        "logger=none",
        "method.scaling_factor=0.0,1.0",
        "taskpool.splits=[validation,test]",
        f"hydra.sweep.dir={sweep}",
    ]
    code, out, err = run_cli(sweep_args, capsys)
    assert code == 0, err
    assert (
        out.count("already finished in an earlier run") == 1
        and reports[0].stat().st_mtime_ns == before
    )
    assert "test/avg_acc" in json.loads(reports[1].read_text())["metrics"]
    assert report_main([str(sweep)]) == 0
    assert "jobs have a report" not in capsys.readouterr().err


def test_dry_run_prints_config_and_estimate(hf_cli_args, tmp_path, capsys):
    code, out, err = run_cli([*hf_cli_args, "dry_run=true", f"hydra.run.dir={tmp_path}"], capsys)
    assert code == 0, err
    assert "memory estimate" in out and "scaling_factor" in out
    assert not (tmp_path / "report.json").exists()


def test_unknown_method_names_options(capsys):
    code, _, err = run_cli(["method=no_such_method"], capsys)
    assert code != 0
    assert "no_such_method" in err and "task_arithmetic" in err  # Hydra lists the options


def test_missing_checkpoint_is_a_clear_error(hf_cli_args, tmp_path, capsys):
    args = [a for a in hf_cli_args if not a.startswith("modelpool.finetuned")]
    code, _, err = run_cli(
        [
            *args,
            "modelpool.finetuned={mnist:/nonexistent/mnist,eurosat:/x/y}",
            f"hydra.run.dir={tmp_path}",
            "logger=none",
        ],
        capsys,
    )
    assert code == 2
    assert "/nonexistent/mnist" in err and "Traceback" not in err


def test_unknown_task_is_a_clear_error(hf_cli_args, tmp_path, capsys):
    args = [a for a in hf_cli_args if not a.startswith(("suite.tasks", "taskpool.datasets"))]
    code, _, err = run_cli(
        [*args, "suite.tasks=[mnist,eurosatt]", f"hydra.run.dir={tmp_path}", "logger=none"], capsys
    )
    assert code == 2, err
    assert "eurosatt" in err and "eurosat" in err and "Traceback" not in err


def test_console_script_help_is_fast_and_lists_groups():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    exe = Path(sys.executable).parent / "fusion_bench"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "fusion_bench"]
    proc = subprocess.run([*cmd, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for group in ("method", "modelpool", "taskpool", "suite", "logger"):
        assert f"{group}:" in proc.stdout


def console(line: str, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    """A console-script command line (``fusion_bench ...``, ``fusion_bench-report ...``) as a
    user types it, in a fresh process in ``cwd``, offline; ``extra`` arguments appended."""
    import shlex

    argv = shlex.split(line)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run(
        [str(Path(sys.executable).parent / argv[0]), *argv[1:], *extra],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def readme_block(marker: str) -> list[str]:
    """The lines of the README's bash block that contains ``marker``."""
    import re

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", readme, re.S) if marker in b)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_sweep_and_report_run_verbatim_from_an_empty_directory(tmp_path):
    """The README's sweep line and report line, as a user types them, in a fresh directory (the
    console scripts in subprocesses; no hydra.sweep.dir: that is what crashed every sweep)."""
    lines = readme_block("fusion_bench -m ")
    sweep_line = next(line for line in lines if line.startswith("fusion_bench -m "))
    report_line = next(line for line in lines if line.startswith("fusion_bench-report "))
    # Added to the README's line, and only these: one batch per task and no W&B files (time).
    proc = console(sweep_line, tmp_path, "fast_dev_run=true", "logger=none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun").iterdir()  # multirun/<timestamp>
    jobs = sorted(p.parent.name for p in sweep.glob("*/report.json"))
    assert jobs == [f"{i}-task_arithmetic" for i in range(5)]
    proc = console(report_line.replace("<timestamp>", sweep.name), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Best by validation/avg_acc" in proc.stdout


def test_a_saved_merge_evaluates_again_with_method_checkpoint(open_clip_cli_args, tmp_path, capsys):
    """Evaluate any checkpoint: a merge saved by one run, evaluated by the next, gives the same
    metrics; the model card says how."""
    merged = tmp_path / "merged"
    code, _, err = run_cli(
        [
            *open_clip_cli_args,
            "logger=none",
            f"hydra.run.dir={tmp_path}/a",
            f"merged_model_save_path={merged}",
        ],
        capsys,
    )
    assert code == 0, err
    assert "method=checkpoint method.path=" in (merged / "README.md").read_text()
    code, _, err = run_cli(
        [
            *open_clip_cli_args,
            "method=checkpoint",
            f"method.path={merged}",
            "logger=none",
            f"hydra.run.dir={tmp_path}/b",
        ],
        capsys,
    )
    assert code == 0, err
    first = json.loads((tmp_path / "a" / "report.json").read_text())["metrics"]
    again = json.loads((tmp_path / "b" / "report.json").read_text())["metrics"]
    assert again == pytest.approx(first, abs=1e-6)
    code, _, err = run_cli([*open_clip_cli_args, "method=checkpoint", "logger=none"], capsys)
    assert code == 2 and "method.path" in err


def test_checkpoint_docs_commands_run_verbatim(tmp_path):
    """docs/methods/baselines.md: save a tiny8 merge, evaluate it again — the two offline lines,
    as written, in a fresh directory (the third needs a hub pool and network)."""
    import re

    page = (Path(__file__).parents[1] / "docs" / "methods" / "baselines.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", page, re.S) if "checkpoint" in b)
    lines = [line.split("#")[0].strip() for line in block.splitlines()][:2]
    reports = []
    for i, line in enumerate(lines):
        # Added, and only this: a known report path to compare the two runs.
        proc = console(line, tmp_path, f"report_save_path={tmp_path / f'report{i}.json'}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports.append(json.loads((tmp_path / f"report{i}.json").read_text())["metrics"])
    assert reports[1] == pytest.approx(reports[0], abs=1e-6)


def test_optuna_searches_lambda_on_tiny8(tmp_path):
    """hydra/sweeper=optuna_lambda maximises the validation accuracy the jobs return (issue 11);
    without a validation split the job says what to add instead of handing Optuna a None."""
    import yaml

    # the docs' command, with 2 trials, 32 images per task and no W&B files (time)
    line = "fusion_bench -m hydra/sweeper=optuna_lambda taskpool.splits=[validation,test]"
    extra = ["hydra.sweeper.n_trials=2", "taskpool.max_samples_per_task=32", "logger=none"]
    proc = console(line, tmp_path, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = tmp_path.glob("multirun/*/optimization_results.yaml")
    best = yaml.safe_load(result.read_text())
    assert 0.0 <= best["best_params"]["method.scaling_factor"] <= 1.0
    assert 0.0 < best["best_value"] <= 1.0
    proc = console("fusion_bench -m hydra/sweeper=optuna_lambda", tmp_path, *extra)
    assert proc.returncode != 0 and "taskpool.splits=[validation,test]" in proc.stderr


def test_own_pool_config_with_config_dir(open_clip_pool_files, tiny_datasets, tmp_path, capsys):
    """docs/migrating.md: a user's model-pool YAML in their own folder, extending a built-in pool,
    found with --config-dir (here extending the open_clip pool with the tiny test files, as no hub
    pool is reachable offline)."""
    from tests.conftest import dict_override

    f = open_clip_pool_files
    folder = tmp_path / "my_configs" / "modelpool"
    folder.mkdir(parents=True)
    experts = "\n".join(f"  {task}: '{path}'" for task, path in f["experts"].items())
    (folder / "mine.yaml").write_text(
        "defaults:\n  - open_clip\n  - _self_\n"
        f"model_name: {f['model_name']}\nmodel_config: '{f['config']}'\n"
        f"pretrained: '{f['pretrained']}'\nfinetuned:\n{experts}\n"
    )
    code, out, err = run_cli(
        [
            "--config-dir",
            str(tmp_path / "my_configs"),
            "modelpool=mine",
            f"suite.tasks=[{','.join(TASKS)}]",
            f"taskpool.datasets={dict_override(tiny_datasets)}",
            "method=ties_merging",
            "logger=none",
            "fast_dev_run=true",
            f"hydra.run.dir={tmp_path}/run",
        ],
        capsys,
    )
    assert code == 0, err
    assert "== ties_merging ==" in out


def test_an_unwritable_output_location_is_one_clear_error(tmp_path, monkeypatch):
    """Hydra makes the run directory before our code runs: from a read-only working directory
    it failed with three chained tracebacks. The console script checks that place first."""
    from fusion_bench import cli

    (tmp_path / "outputs").write_text("a file where the runs' directory would go")
    done = console("fusion_bench", tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "is not a directory" in done.stderr and "hydra.run.dir" not in done.stdout
    (tmp_path / "ro").mkdir()
    monkeypatch.chdir(tmp_path / "ro")

    def read_only(self, data):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "write_bytes", read_only)
    sweep = ["-m", "method.scaling_factor=0.1"]
    for argv, option in (([], "hydra.run.dir"), (sweep, "hydra.sweep.dir")):
        problem = cli._check_output_root(argv)
        assert "Permission denied" in problem and f"set {option}=" in problem
    assert cli._check_output_root(["--cfg", "job"]) is None  # printing writes nothing
