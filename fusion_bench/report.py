"""Aggregate the JSON reports of a sweep into one table and name the best setting.

    fusion_bench-report multirun/2026-11-23/12-00-00            # markdown to stdout
    fusion_bench-report <sweep dir> --csv results.csv --markdown results.md

The best setting is chosen by ``validation/avg_acc`` only; test accuracy is shown, never used to
select. A sweep without validation metrics (run it with ``taskpool.splits=[validation,test]``)
gets a table but no "best" line.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

SELECT_BY = "validation/avg_acc"


def read_report(path: Path) -> dict | None:
    """A job's report.json, or None if it is missing, empty or truncated."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def collect(sweep_dir: Path, unreadable: list[str] | None = None) -> list[dict]:
    """One row per job report under ``sweep_dir``: its overrides and its metrics. Reports that
    cannot be read (empty, truncated) are skipped and listed in ``unreadable``."""
    rows = []
    for path in sorted(sweep_dir.rglob("report.json"), key=lambda p: str(p)):
        report = read_report(path)
        if report is None:
            if unreadable is not None:
                unreadable.append(str(path))
            continue
        if "metrics" not in report:
            continue  # a dry run
        rows.append(
            {
                "job": str(path.parent.relative_to(sweep_dir)),
                "setting": " ".join(report.get("overrides") or []) or "(defaults)",
                **report["metrics"],
            }
        )
    return rows


def expected_jobs(sweep_dir: Path) -> int | None:
    """How many jobs the sweep launched: the product of the comma-separated values of its
    command-line overrides (``multirun.yaml``), or None if that file is missing."""
    import yaml

    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return None
    try:
        overrides = yaml.safe_load(path.read_text())["hydra"]["overrides"]["task"]
    except (ValueError, KeyError, TypeError, yaml.YAMLError):
        return None
    total = 1
    for override in overrides:
        _, _, value = override.partition("=")
        depth, values = 0, 1
        for char in value:  # commas inside [...] or {...} are one value
            if char in "[{(":
                depth += 1
            elif char in "]})":
                depth -= 1
            elif char == "," and depth == 0:
                values += 1
        total *= values
    return total


def best(rows: list[dict]) -> dict | None:
    scored = [r for r in rows if SELECT_BY in r]
    return max(scored, key=lambda r: r[SELECT_BY]) if scored else None


def columns(rows: list[dict]) -> list[str]:
    metric_cols = sorted(
        {k for r in rows for k in r if k.endswith("acc")},
        key=lambda k: (not k.endswith("avg_acc"), k),
    )
    return ["job", "setting", *metric_cols]


def to_markdown(rows: list[dict]) -> str:
    cols = columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [
            f"{100 * r[c]:.2f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols
        ]
        lines.append("| " + " | ".join(cells) + " |")
    winner = best(rows)
    if winner is None:
        lines.append(
            f"\nNo {SELECT_BY} in these reports: re-run the sweep with "
            "`taskpool.splits=[validation,test]` to select a setting (test accuracy is "
            "never used for selection)."
        )
    else:
        test = winner.get("test/avg_acc")
        lines.append(
            f"\nBest by {SELECT_BY}: `{winner['setting']}` (job {winner['job']}): "
            f"validation {100 * winner[SELECT_BY]:.2f}%"
            + (f", test {100 * test:.2f}%" if test is not None else "")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fusion_bench-report", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--csv", type=Path, help="also write the table as CSV")
    parser.add_argument("--markdown", type=Path, help="also write the markdown table to a file")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"fusion_bench-report: error: '{args.sweep_dir}' is not a directory", file=sys.stderr)
        return 2
    unreadable: list[str] = []
    rows = collect(args.sweep_dir, unreadable)
    for path in unreadable:
        print(f"fusion_bench-report: warning: skipped unreadable report {path}", file=sys.stderr)
    expected = expected_jobs(args.sweep_dir)
    if expected is not None and len(rows) < expected:
        print(
            f"fusion_bench-report: warning: {len(rows)} of the sweep's {expected} jobs have a "
            "report: the sweep is incomplete, and the best setting is only the best of those.",
            file=sys.stderr,
        )
    if not rows:
        print(
            f"fusion_bench-report: error: no report.json under '{args.sweep_dir}'. Is it the "
            "sweep directory of a `fusion_bench -m ...` run?",
            file=sys.stderr,
        )
        return 2
    text = to_markdown(rows)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.csv:
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns(rows), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
