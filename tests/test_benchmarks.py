"""Regression check of the benchmark harness (``make bench``), small enough for CI.

Runs ``benchmarks/run_all.py`` end to end on a small synthetic pool (25 MB experts): it must
produce a well-formed table with the naive bound and task arithmetic at N = 2 and N = 6, and task
arithmetic's peak RSS must not grow with N the way materialising the experts would. Only ratios
and memory are checked, never seconds: timings on shared CI machines are noise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from pools import build_flat_pool, pool_bytes  # noqa: E402

# ~6.3M float32 entries per expert (25 MB): materialising 4 more experts would add 100 MB, far above
# the run-to-run noise of an interpreter's peak RSS (a few MB).
SHAPES = {f"encoder.layers.{i}.mlp.fc{j}.weight": (1024, 768) for i in range(4) for j in (1, 2)}
SHAPES |= {f"encoder.layers.{i}.mlp.fc1.bias": (1024,) for i in range(4)}


def test_harness_table_and_flat_memory(tmp_path):
    pool = build_flat_pool(tmp_path / "pool", 6, SHAPES)
    out = tmp_path / "results.json"
    # A fixed mmap threshold: freed blocks above 128 KiB go back to the OS, so the peak RSS
    # measures what the merge holds, not glibc's heap growth (which measured +31 MB from N=2 to
    # N=6 in one CI run without it; see tests/test_memory.py).
    env = dict(
        os.environ, FUSION_BENCH_CACHE=str(tmp_path / "cache"), MALLOC_MMAP_THRESHOLD_="131072"
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "run_all.py"),
            "--pool",
            str(pool),
            "--experts",
            "2",
            "6",
            "--runs",
            "1",
            "--methods",
            "task_arithmetic",
            "--no-startup",
            "--no-eval",
            "--no-warmup",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]

    # the markdown table: a header, a separator, one row per (N, job), all with the same columns
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    header = table[0]
    assert header.startswith("| method | N | wall (s)")
    assert all(line.count("|") == header.count("|") for line in table)
    rows = {(cells[1], cells[2]): cells for cells in (line.split("|") for line in table[1:])}
    for n in ("2", "6"):
        assert float(rows[(" naive ", f" {n} ")][5]) == 1.0  # the bound is its own unit
        assert float(rows[(" task_arithmetic ", f" {n} ")][5]) > 0.0

    merges = json.loads(out.read_text())["merges"]["pool"]
    expert_bytes = pool_bytes(pool, 1) - pool_bytes(pool, 0)
    ta2, ta6 = merges["2"]["task_arithmetic"], merges["6"]["task_arithmetic"]
    assert ta2["runs"] == ta6["runs"] == 1
    # Materialising the experts would add 4 experts (100 MB) from N=2 to N=6; streaming adds ~0.
    assert ta6["rss"] - ta2["rss"] < 1.0 * expert_bytes, (ta2["rss"], ta6["rss"], expert_bytes)
    # the merged output is on disk while the run lasts; the harness cleans its output directory
    assert not (tmp_path / "cache" / "bench" / "out").exists()


def test_lora_benchmark_measures_every_space_on_tiny8():
    """benchmarks/lora_merge.py's measurement, on the shipped tiny8 LoRA experts (in-process:
    the script runs each cell in a fresh process the same way)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "lora_merge", REPO / "benchmarks" / "lora_merge.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for space in bench.SPACES:
        cell = bench.one("tiny8", "TA", space)
        assert cell["seconds"] > 0 and cell["peak_rss_mib"] > 0
