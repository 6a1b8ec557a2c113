"""Finished work is not lost, and outputs are never half-written (issue 11, bugs 2 and 3):
everything that can fail after the merge is checked before it; the report is written first and
kept when saving the model fails; files are written under a temporary name and renamed."""

from __future__ import annotations

import json
import os

import pytest

from fusion_bench.checkpoint import write_atomically
from tests.conftest import TASKS, dict_override
from tests.test_cli import run_cli


def umask() -> int:
    value = os.umask(0)
    os.umask(value)
    return value


def test_a_missing_dataset_of_the_last_task_fails_before_the_merge(
    hf_cli_args, tiny_datasets, tmp_path, capsys
):
    datasets = {**tiny_datasets, TASKS[-1]: str(tmp_path / "gone")}
    args = [a for a in hf_cli_args if not a.startswith("taskpool.datasets")]
    code, out, err = run_cli(
        [
            *args,
            f"taskpool.datasets={dict_override(datasets)}",
            "logger=none",
            f"hydra.run.dir={tmp_path}/run",
        ],
        capsys,
    )
    assert code == 2 and TASKS[-1] in err and "does not exist" in err
    assert "== task_arithmetic ==" not in out  # nothing was merged or evaluated


def test_an_unwritable_head_cache_fails_before_the_merge(
    hf_cli_args, tmp_path, capsys, monkeypatch
):
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("FUSION_BENCH_CACHE", str(blocker))
    code, out, err = run_cli([*hf_cli_args, "logger=none", f"hydra.run.dir={tmp_path}/run"], capsys)
    assert code == 2 and "head cache" in err and "FUSION_BENCH_CACHE" in err
    assert "== task_arithmetic ==" not in out


def run_and_save(cli_args, run_dir, target, capsys, *extra) -> tuple[int, str]:
    """The default method on the tiny HF pool, saving its merge to ``target``."""
    code, _, err = run_cli(
        [
            *cli_args,
            "logger=none",
            f"hydra.run.dir={run_dir}",
            f"merged_model_save_path={target}",
            *extra,
        ],
        capsys,
    )
    return code, err


def test_the_report_survives_a_failed_save(hf_cli_args, tmp_path, capsys, monkeypatch):
    from fusion_bench.modelpool.clip_vision import CLIPVisionModelPool

    def full_disk(self, state_dict, path, card):
        (path / "config.json").write_text("{}")  # what an HF save leaves on a full disk
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(CLIPVisionModelPool, "save", full_disk)
    run_dir, target = tmp_path / "run", tmp_path / "merged"
    code, err = run_and_save(hf_cli_args, run_dir, target, capsys)
    assert code == 2 and "No space left" in err and "report.json" in err
    report = json.loads((run_dir / "report.json").read_text())
    assert "test/avg_acc" in report["metrics"] and "No space left" in report["save_error"]
    assert not target.exists()  # no half-written model at the path ...
    assert not list(tmp_path.glob(".merged.partial-*"))  # ... and no temporary left behind


def test_saved_outputs_are_whole_and_ordinary_files(hf_cli_args, tmp_path, capsys):
    run_dir, target = tmp_path / "run", tmp_path / "merged"
    code, err = run_and_save(hf_cli_args, run_dir, target, capsys)
    assert code == 0, err
    for path in [run_dir / "report.json", *target.iterdir()]:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask(), path
    assert not list(tmp_path.glob(".*partial*")) and not list(run_dir.glob(".*partial*"))
    # overwrite=true replaces the directory at the path with the new model, and a file too
    code, err = run_and_save(hf_cli_args, tmp_path / "run2", target, capsys, "overwrite=true")
    assert code == 0, err
    assert (target / "README.md").is_file()
    a_file = tmp_path / "merged_file"
    a_file.write_text("not a model")
    code, err = run_and_save(hf_cli_args, tmp_path / "run3", a_file, capsys, "overwrite=true")
    assert code == 0, err
    assert a_file.is_dir() and (a_file / "README.md").is_file()
    assert not list(tmp_path.glob(".merged*replaced*"))


def test_write_atomically_leaves_the_old_file_on_failure(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomically(path, fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]
    stale = tmp_path / ".report.json.partial-999999999"  # a killed writer's leftover
    stale.write_text("x")
    write_atomically(path, lambda tmp: tmp.write_text("new"))
    assert path.read_text() == "new" and not stale.exists()


def test_a_killed_model_save_leaves_nothing_that_outlives_the_next_run(
    hf_cli_args, tmp_path, capsys
):
    """A SIGKILL during an HF save leaves a hidden full-size directory (and, during a replace,
    the old model under a hidden name): the next save to that path removes both; a live
    writer's temporary is left alone."""
    import subprocess
    import sys

    finished = [sys.executable, "-c", "import os; print(os.getpid())"]
    dead_pid = int(subprocess.run(finished, capture_output=True, text=True, check=True).stdout)
    left = [tmp_path / f".merged.partial-{dead_pid}", tmp_path / f".merged.replaced-{dead_pid}"]
    for stale in left:
        stale.mkdir()
        (stale / "model.safetensors").write_bytes(b"\0" * 1024)
    alive = tmp_path / f".merged.partial-{os.getppid()}"  # a running process's: not ours to take
    alive.mkdir()
    code, err = run_and_save(hf_cli_args, tmp_path / "run", tmp_path / "merged", capsys)
    assert code == 0, err
    assert not any(p.exists() for p in left) and alive.is_dir()


def test_the_api_returns_a_finished_merge_when_saving_fails(tmp_path, monkeypatch):
    import torch

    import fusion_bench
    from fusion_bench import checkpoint
    from fusion_bench.errors import FusionBenchError

    pre, experts = {"w": torch.zeros(3)}, [{"w": torch.ones(3)}]
    with pytest.raises(FusionBenchError, match="Cannot write save_to"):  # checked before merging
        blocker = tmp_path / "file"
        blocker.write_text("x")
        fusion_bench.merge("simple_average", pre, experts, save_to=blocker / "out.safetensors")

    def full_disk(state, path, metadata, exclusive=False):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_safetensors", full_disk)
    with pytest.warns(UserWarning, match="No space left"):
        out = fusion_bench.merge("simple_average", pre, experts, save_to=tmp_path / "m.safetensors")
    assert torch.equal(out["w"], torch.ones(3))


def test_exclusive_writes_never_replace_a_file_created_meanwhile(tmp_path):
    path = tmp_path / "merged.safetensors"

    def racing(tmp):
        tmp.write_text("ours")
        path.write_text("theirs")  # another process got there first

    with pytest.raises(FileExistsError):
        write_atomically(path, racing, exclusive=True)
    assert path.read_text() == "theirs" and [p.name for p in tmp_path.iterdir()] == [path.name]
