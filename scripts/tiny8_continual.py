"""The continual-merging rows of docs/tiny8.md: every ``conf/method/continual/*`` method on tiny8
under the sequential protocol, over several random task orders (``sequence.shuffle_seed``), one
``fusion_bench -m`` sweep; prints a markdown table of the final test average accuracy and the
backward transfer (mean ± std over the orders).

    python scripts/tiny8_continual.py [--seeds 0 1 2] [--methods continual/opcm ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    methods = sorted(
        f"continual/{p.stem}" for p in (ROOT / "conf" / "method" / "continual").glob("*.yaml")
    )
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=methods)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as sweep:
        command = [
            sys.executable,
            "-m",
            "fusion_bench",
            "-m",
            f"method={','.join(args.methods)}",
            f"sequence.shuffle_seed={','.join(map(str, args.seeds))}",
            "logger=none",
            f"hydra.sweep.dir={sweep}",
        ]
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
        rows: dict[str, list[tuple[float, float]]] = {}
        for path in Path(sweep).rglob("report.json"):
            report = json.loads(path.read_text())
            rows.setdefault(report["method"], []).append(
                (100 * report["metrics"]["test/avg_acc"], 100 * report["continual"]["bwt"]["test"])
            )

    def spread(xs: list[float]) -> float:
        return statistics.stdev(xs) if len(xs) > 1 else 0.0

    print("| method | orders | final test avg (mean ± std) | BWT, points (mean ± std) |")
    print("|---|---|---|---|")
    for method, values in sorted(rows.items()):
        accs, bwts = [a for a, _ in values], [b for _, b in values]
        print(
            f"| `{method}` | {len(values)} | {statistics.mean(accs):.1f} ± {spread(accs):.1f} "
            f"| {statistics.mean(bwts):+.1f} ± {spread(bwts):.1f} |"
        )


if __name__ == "__main__":
    main()
