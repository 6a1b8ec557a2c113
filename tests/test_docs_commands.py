"""Docs are tests (issue 11): every `fusion_bench ...` command in the README, docs/ and the
`--help` text (conf/config.yaml) runs as written, from an empty working directory, offline.
(The example lines in the comments of the other conf/ files are parsed, and every method YAML
runs in tests/test_method_contract.py.)

A command that cannot run here says so in its own trailing comment with the word ``needs`` (it
needs the Hugging Face hub, a GPU, your own checkpoints or a previous run) and is only parsed
(tests/test_docs.py). Every other command runs in-process through the console script's
``main()`` (the same Hydra entry point; a fresh process per command would cost ~5 s of imports
each), with one stated addition: ``fast_dev_run=true`` (one batch per task, one adaptation
step), because the test checks that the documented command works, not its numbers (and, for
an Optuna search, two trials instead of the documented number); the README's
sweep and report lines also run verbatim in fresh processes with nothing added
(tests/test_cli.py).
"""

from __future__ import annotations

import shlex

import pytest

from tests.test_cli import run_cli
from tests.test_docs import documented_commands

NETWORK_POOLS = ("modelpool=clip_vision", "modelpool=open_clip")


def declared_unrunnable(command: str) -> bool:
    _, _, comment = command.partition(" #")
    return "needs" in comment


def runnable() -> dict[tuple[str, ...], str]:
    """{argv: where} of the commands that must run offline (identical command lines once)."""
    found: dict[tuple[str, ...], str] = {}
    for where, command in documented_commands():
        if declared_unrunnable(command):
            continue
        if where.startswith("conf/") and not where.startswith("conf/config.yaml"):
            continue  # a method's or pool's own example: every conf/method YAML runs in
            # tests/test_method_contract.py; these lines are parsed (tests/test_docs.py)
        argv = tuple(shlex.split(command, comments=True)[1:])
        found.setdefault(argv, where)
    return found


def test_commands_that_cannot_run_offline_say_so():
    """A command on a hub pool, on CUDA or on a path of the user's must carry '# needs ...'."""
    bad = [
        f"{where}: {command}"
        for where, command in documented_commands()
        if not declared_unrunnable(command)
        and (
            any(p in command for p in NETWORK_POOLS)
            or "accelerator=cuda" in command
            or "$" in command
            or "--config-dir" in command
            or "method.path=/" in command
        )
    ]
    assert not bad, "add '# needs <what>' to:\n" + "\n".join(bad)


COMMANDS = runnable()


@pytest.mark.parametrize("argv", list(COMMANDS), ids=[COMMANDS[a] for a in COMMANDS])
def test_documented_command_runs(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # an empty working directory, as a new user's
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    extra = ["fast_dev_run=true"]
    if "hydra/sweeper=optuna_lambda" in argv:
        extra.append("hydra.sweeper.n_trials=2")  # the search runs; 30 trials would take minutes
    code, out, err = run_cli([*argv, *extra], capsys)
    assert code == 0, f"{COMMANDS[argv]}: fusion_bench {' '.join(argv)}\n{err[-3000:]}"
