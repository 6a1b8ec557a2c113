"""``fusion_bench`` console script: Hydra composes conf/, the runner does the rest.

Kept free of heavy imports (torch, open_clip, lightning ...) so that ``fusion_bench --help`` and
shell completion answer quickly; the runner imports them when a job actually runs.
"""

from __future__ import annotations

import sys


def _user_error(e: BaseException):
    """The FusionBenchError behind ``e``, if any (Hydra's instantiate wraps what targets raise)."""
    from fusion_bench.errors import FusionBenchError

    while e is not None:
        if isinstance(e, FusionBenchError):
            return e
        e = e.__cause__ or e.__context__
    return None


def _job(cfg):
    """One job; returns the run's objective (``cfg.objective``, validation average accuracy by
    default) so that a search sweeper (``hydra/sweeper=optuna_lambda``) can maximise it."""
    try:
        from fusion_bench.runner import objective, run

        return objective(cfg, run(cfg))
    except Exception as e:
        user_error = _user_error(e)
        if user_error is None:
            raise  # a bug: keep the traceback
        # A problem the user can fix: the message says what and how; a traceback would only hide it.
        print(f"fusion_bench: error: {user_error}", file=sys.stderr)
        sys.exit(2)


# Hydra flags that only print (help, config, completion): they write nothing.
_PRINT_ONLY = ("-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info", "-sc")
_PRINT_ONLY += ("--shell-completion", "--version")


def _check_output_root(argv: list[str]) -> str | None:
    """Why Hydra could not create this run's directory, or None. Hydra makes it before any of
    our code runs and fails with three chained tracebacks; this checks the same place first:
    the directory the run or sweep directory is created in (the working directory by default)."""
    import os
    from pathlib import Path

    if any(a in _PRINT_ONLY or a.split("=")[0] in _PRINT_ONLY for a in argv):
        return None
    option = "hydra.sweep.dir" if ("-m" in argv or "--multirun" in argv) else "hydra.run.dir"
    given = [a.split("=", 1)[1] for a in argv if a.split("=", 1)[0].lstrip("+") == option]
    target = Path(given[-1]) if given and "${" not in given[-1] else Path("outputs")
    existing = target if target.is_absolute() else Path.cwd() / target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"'{existing}' is not a directory, so the run directory '{target}' cannot be made"
    probe = existing / f".fusion_bench-write-check-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        where = "the working directory" if not given else f"{option}"
        return (
            f"cannot create the run's output directory in '{existing}' ({where}: "
            f"{e.strerror or e}). Run from a writable directory, or set {option}=<a writable "
            "path>."
        )
    return None


def main() -> None:
    import hydra

    from fusion_bench.paths import config_dir

    problem = _check_output_root(sys.argv[1:])
    if problem is not None:
        print(f"fusion_bench: error: {problem}", file=sys.stderr)
        sys.exit(2)

    hydra.main(version_base=None, config_path=str(config_dir()), config_name="config")(_job)()


if __name__ == "__main__":
    main()
