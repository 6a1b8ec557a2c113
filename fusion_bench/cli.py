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


def main() -> None:
    import hydra

    from fusion_bench.paths import config_dir

    hydra.main(version_base=None, config_path=str(config_dir()), config_name="config")(_job)()


if __name__ == "__main__":
    main()
