"""``make bench``: merge speed and memory of every data-free method, start-up time, evaluation
throughput; a markdown table next to the targets of docs/benchmarks.md.

Each measurement is a fresh process (``benchmarks/merge_once.py`` for a method,
``benchmarks/naive_sum.py`` for the naive lower bound), timed for wall time, with its peak RSS
from ``os.wait4`` (that child's own ``ru_maxrss``). Runs are interleaved round-robin (naive,
method 1, method 2, ...) so that load drift from other processes spreads over all rows; each
cell is the median of ``--runs`` runs with the min–max spread. Before the runs of each pool the
weight files are read once (warm page cache) and one untimed naive run warms the Python and
torch files. Every method is reported as a ratio to the naive bound of the same pool.

Pools are built on first use (``benchmarks/pools.py``) under ``$FUSION_BENCH_CACHE/bench``.
Results go to stdout and to ``$FUSION_BENCH_CACHE/bench/results/<timestamp>.{md,json}``.

Run: ``make bench`` or ``.venv/bin/python benchmarks/run_all.py [--arch b32 l14] [--runs 3]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from pools import bench_root, pool_bytes, pool_files  # noqa: E402

PY = sys.executable
GIB = 2**30


@dataclass
class Case:
    """One benchmarked configuration of a method (``conf`` = its name under conf/method/)."""

    label: str
    conf: str
    overrides: list[str] = field(default_factory=list)
    streaming: bool = True  # elementwise / per-key: its peak RSS must not grow with N
    save: str = "safetensors"
    default: bool = True  # run without --methods

    def args(self, n: int) -> list[str]:
        # weighted_average needs one weight per expert: 1, 2, ..., N (normalised by the method)
        return [o.replace("{weights}", str(list(range(1, n + 1)))) for o in self.overrides]


CASES = [
    Case("simple_average", "simple_average"),
    Case("task_arithmetic", "task_arithmetic", ["scaling_factor=0.3"]),
    Case("ties_merging", "ties_merging", ["threshold=20", "scaling_factor=0.3"]),
    Case("dare+task_arithmetic", "dare", ["base=task_arithmetic", "sparsity_ratio=0.5"]),
    Case("dare+ties_merging", "dare", ["base=ties_merging", "sparsity_ratio=0.5"], default=False),
    Case("magmax", "magmax"),
    Case("weighted_average", "weighted_average", ["weights={weights}"]),
    Case("model_stock", "model_stock", streaming=False),  # holds the N tensors of one key
    Case("tsv_m", "tsv_m"),  # per key: U, s, V of one tensor, whatever N
    Case("iso_c", "iso_c"),  # per key: one running sum and its Gram matrix
    # issue 16's data-free merges (not in the default run: `--methods <label> ...`)
    Case("iso_cts", "iso_cts", default=False),  # per key: the sum and N residual bases
    Case("svc+task_arithmetic", "svc", default=False),  # base streams; then one SVD per key
    Case("svc+tsv_m", "svc_tsv_m", default=False),
    Case("lines+task_arithmetic", "lines", default=False),  # base + one norm pass (alpha: null)
    Case("dare+ties_merging (preset)", "dare_ties_merging", default=False),
    Case("consensus", "consensus", default=False),
    Case("pcb_merging", "pcb_merging", default=False),
    Case("cart", "cart", default=False),
    Case("wudi", "wudi", default=False),
    Case("dc_merge", "dc_merge", default=False),
    Case("localize_and_stitch", "localize_and_stitch", default=False),
    # continual: experts absorbed one at a time; the state is one running update
    Case("continual/task_arithmetic", "continual/task_arithmetic", default=False),
    Case("continual/opcm", "continual/opcm", default=False),
    # the runner's way of saving (CLIPVisionModel.save_pretrained via modelpool.save)
    Case(
        "task_arithmetic (save_pretrained)", "task_arithmetic", ["scaling_factor=0.3"], save="pool"
    ),
]

# (label, max ratio to naive, max seconds, max GiB) at ViT-B/32 x 8 experts
TARGETS = {
    "simple_average": (1.5, None, 1.5),
    "task_arithmetic": (1.5, None, 1.5),
    "ties_merging": (None, 10.0, 2.0),
    "tsv_m": (None, 30.0, 2.0),
    "iso_c": (None, 8.0, 2.0),
}
STARTUP_TARGET_S = 2.5
RSS_FLAT = 1.10  # N=20 over N=8


# --- measuring ------------------------------------------------------------------------------------
def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def measure(cmd: list[str], cwd: Path = REPO) -> dict:
    """Run ``cmd`` to completion: wall seconds, peak RSS (bytes), exit code, last stdout line."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=cwd, env=child_env())
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not all children's
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss: KiB on Linux
    lines = stdout.strip().splitlines()
    return {
        "wall_s": wall,
        "rss": usage.ru_maxrss * scale,
        "rc": proc.returncode,
        "last": lines[-1] if lines else "",
        "stderr": stderr.strip().splitlines()[-3:],
    }


def warm_files(files: list[Path]) -> None:
    """Read every file once, so that the timed runs see a warm page cache."""
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if r["rc"] == 0]
    if len(ok) < len(runs):
        bad = next(r for r in runs if r["rc"] != 0)
        return {"error": f"exit {bad['rc']}: {' | '.join(bad['stderr'])[-300:]}"}
    walls = [r["wall_s"] for r in ok]
    rss = [r["rss"] for r in ok]
    out = {
        "wall_s": statistics.median(walls),
        "wall_min": min(walls),
        "wall_max": max(walls),
        "rss": statistics.median(rss),
        "rss_max": max(rss),
        "runs": len(ok),
    }
    phases = []
    for r in ok:
        try:
            phases.append(json.loads(r["last"]))
        except ValueError:
            pass
    if phases:
        out["phases"] = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
    return out


# --- the parts of the benchmark ---------------------------------------------------------------------
def startup(runs: int) -> dict:
    fb = str(Path(PY).parent / "fusion_bench")
    cmds = {
        "python -c 'import fusion_bench'": [PY, "-c", "import fusion_bench"],
        "fusion_bench --help": [fb, "--help"],
        "python -c 'import torch' (reference)": [PY, "-c", "import torch"],
    }
    for cmd in cmds.values():  # untimed: warm the page cache for the imported files
        measure(cmd)
    samples: dict[str, list[dict]] = {k: [] for k in cmds}
    for _ in range(runs):
        for name, cmd in cmds.items():
            samples[name].append(measure(cmd))
    return {name: summarize(s) for name, s in samples.items()}


REFERENCE_METHODS = ("task_arithmetic", "tsv_m", "iso_c")  # benchmarks/fusionbench_reference.py


def merges(
    pool: Path,
    n: int,
    cases: list[Case],
    runs: int,
    out_root: Path,
    log,
    warmup: bool = True,
    reference_python: str | None = None,
) -> dict:
    naive_out = out_root / "naive" / "model.safetensors"
    naive_cmd = [PY, str(HERE / "naive_sum.py"), str(pool), str(n), str(naive_out)]
    if warmup:
        warm_files(pool_files(pool, n))
        measure(naive_cmd)  # untimed warm-up of the interpreter, torch and safetensors files
    jobs: dict[str, list[str]] = {"naive": naive_cmd}
    for case in cases:
        cmd = [
            PY,
            str(HERE / "merge_once.py"),
            case.conf,
            str(pool),
            str(n),
            str(out_root / "merged"),
            *case.args(n),
            "--save",
            case.save,
        ]
        jobs[case.label] = cmd
        if reference_python and case.label in REFERENCE_METHODS:  # FusionBench, same run
            reference = HERE / "fusionbench_reference.py"
            ref_out = str(out_root / "reference")
            jobs[f"{case.label} (FusionBench)"] = [
                reference_python,
                str(reference),
                case.label,
                str(pool),
                str(n),
                ref_out,
            ]
    samples: dict[str, list[dict]] = {k: [] for k in jobs}
    for r in range(runs):
        for label, cmd in jobs.items():
            result = measure(cmd)
            samples[label].append(result)
            shutil.rmtree(out_root, ignore_errors=True)
            log(
                f"  N={n} run {r + 1}/{runs} {label}: {result['wall_s']:.2f} s, "
                f"{result['rss'] / 2**20:.0f} MiB" + ("" if result["rc"] == 0 else " FAILED")
            )
            if result["rc"] != 0:  # do not repeat a failing case
                jobs = {k: v for k, v in jobs.items() if k != label}
    return {label: summarize(s) for label, s in samples.items()}


def evaluation(pool: Path, images: int) -> dict:
    r = measure(
        [
            PY,
            str(HERE / "eval_throughput.py"),
            str(pool),
            "--images",
            str(images),
            "--data-root",
            str(bench_root() / "eval_data"),
        ]
    )
    if r["rc"] != 0:
        return {"error": " | ".join(r["stderr"])}
    out = json.loads(r["last"])
    out["peak_rss"] = r["rss"]
    return out


def machine() -> dict:
    cpu = "unknown"
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = None
    if Path("/proc/meminfo").is_file():
        first = Path("/proc/meminfo").read_text().splitlines()[0]  # MemTotal: N kB
        mem = int(first.split()[1]) * 1024
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_version = version("torch")  # not `import torch`: 1-2 s and ~0.8 GiB for a string
    except PackageNotFoundError:
        torch_version = None
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": mem / GIB if mem else None,
        "python": platform.python_version(),
        "torch": torch_version,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


# --- report ------------------------------------------------------------------------------------------
def check_targets(label: str, arch: str, n: int, row: dict, ratio: float | None) -> str:
    if arch != "b32" or n != 8 or label not in TARGETS or "error" in row:
        return ""
    max_ratio, max_s, max_gib = TARGETS[label]
    misses = []
    if max_ratio is not None and ratio is not None and ratio > max_ratio:
        misses.append(f"ratio > {max_ratio}")
    if max_s is not None and row["wall_s"] > max_s:
        misses.append(f"> {max_s:g} s")
    if max_gib is not None and row["rss"] > max_gib * GIB:
        misses.append(f"> {max_gib:g} GiB")
    want = ", ".join(
        x
        for x in (
            f"≤{max_ratio}×" if max_ratio else "",
            f"≤{max_s:g} s" if max_s else "",
            f"≤{max_gib:g} GiB" if max_gib else "",
        )
        if x
    )
    return f"{want}: " + ("MISSED (" + "; ".join(misses) + ")" if misses else "met")


def render(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']:.1f} GiB RAM, Python "
        f"{m['python']}, torch {m['torch']}; {m['date']}; load average before/after: "
        f"{results['load_before']} / {results['load_after']}.",
        "",
    ]
    if "startup" in results:
        lines += [
            "| start-up | median (s) | min–max (s) | peak RSS (MiB) | target |",
            "|---|---|---|---|---|",
        ]
        for name, row in results["startup"].items():
            target = ""
            if "reference" not in name:
                target = f"≤{STARTUP_TARGET_S} s: " + (
                    "met" if row["wall_s"] <= STARTUP_TARGET_S else "MISSED"
                )
            lines.append(
                f"| `{name}` | {row['wall_s']:.2f} | {row['wall_min']:.2f}–{row['wall_max']:.2f} "
                f"| {row['rss'] / 2**20:.0f} | {target} |"
            )
        lines.append("")
    for arch, per_n in results.get("merges", {}).items():
        base_n = min(per_n, key=int) if per_n else None
        lines += [
            f"**{arch}** (median of {results['runs']} runs; ratio = median wall / naive "
            "median wall; phases = in-process imports / merge / save, medians)",
            "",
            f"| method | N | wall (s) | min–max (s) | × naive | peak RSS (MiB) | RSS vs N={base_n} "
            "| phases (s) | target |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for n, rows in per_n.items():
            naive = rows.get("naive", {})
            for label, row in rows.items():
                if "missing" in row:
                    lines.append(f"| {label} | {n} | {row['missing']} | | | | | | |")
                    continue
                if "error" in row:
                    lines.append(f"| {label} | {n} | failed: {row['error']} | | | | | | |")
                    continue
                ratio = row["wall_s"] / naive["wall_s"] if "wall_s" in naive else None
                flat = ""
                small = per_n[base_n].get(label, {})
                if n != base_n and "rss" in small:
                    growth = row["rss"] / small["rss"]
                    flat = f"{100 * (growth - 1):+.1f}%"
                    case = next((c for c in CASES if c.label == label), None)
                    if case is None or case.streaming:
                        flat += " ok" if growth <= RSS_FLAT else " MISSED (>10%)"
                ph = row.get("phases")
                phases = " / ".join(f"{v:.2f}" for v in ph.values()) if ph else ""
                lines.append(
                    f"| {label} | {n} | {row['wall_s']:.2f} | {row['wall_min']:.2f}–{row['wall_max']:.2f} "
                    f"| {ratio:.2f} | {row['rss'] / 2**20:.0f} | {flat} | {phases} "
                    f"| {check_targets(label, arch, int(n), row, ratio)} |"
                )
        lines.append("")
    ev = results.get("evaluation")
    if ev:
        if "error" in ev:
            lines += [f"Evaluation failed: {ev['error']}", ""]
        else:
            lines += [
                f"Evaluation ({ev['images']} random {ev['image_size']}×{ev['image_size']} PNG "
                f"images, eurosat spec, {ev['torch_threads']} torch threads, peak RSS "
                f"{ev['peak_rss'] / 2**20:.0f} MiB):",
                "",
                "| batch | images/s (evaluate) | images/s (load + preprocess only) |",
                "|---|---|---|",
            ]
            for key, row in ev.items():
                if key.startswith("batch"):
                    lines.append(
                        f"| {key[5:]} | {row['images_per_s']:.1f} "
                        f"| {row['preprocess_only_images_per_s']:.1f} |"
                    )
            lines += [
                "",
                f"Zero-shot head: cache miss {ev['head_miss_s']:.2f} s, "
                f"cache hit {1000 * ev['head_hit_s']:.1f} ms.",
                "",
            ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arch",
        nargs="+",
        default=None,
        help="pools to build and run: b32 (default), l14 (~26 GB for 20 experts)",
    )
    parser.add_argument(
        "--pool",
        type=Path,
        nargs="+",
        default=[],
        help="also run existing pool directories (pools.py layout)",
    )
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 20])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=None, help="labels of CASES to run")
    parser.add_argument("--no-startup", action="store_true")
    parser.add_argument("--no-eval", action="store_true")
    parser.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip the page-cache warm-up and the untimed first run (tests)",
    )
    parser.add_argument("--eval-images", type=int, default=256)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--reference-python",
        default=None,
        help="python of a venv with FusionBench (pip install fusion-bench): adds its "
        f"{', '.join(REFERENCE_METHODS)} rows, timed in the same run",
    )
    args = parser.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    cases = [c for c in CASES if (c.label in args.methods if args.methods else c.default)]
    results: dict = {
        "machine": machine(),
        "load_before": load_average(),
        "runs": args.runs,
        "merges": {},
    }
    log(f"load average: {results['load_before']}")
    if not args.no_startup:
        log("start-up times")
        results["startup"] = startup(max(args.runs, 5))

    out_root = bench_root() / "out"
    pools = [(p.name, p) for p in args.pool]
    for arch in args.arch or ([] if args.pool else ["b32"]):
        log(f"building/checking the {arch} pool")
        r = measure([PY, str(HERE / "pools.py"), arch, "--experts", str(max(args.experts))])
        if r["rc"] != 0:
            raise SystemExit(f"building the {arch} pool failed: {r['stderr']}")
        pools.append((arch, Path(r["last"])))
    for arch, pool in pools:
        results["merges"][arch] = {}
        for n in sorted(args.experts):
            log(f"{arch}, N={n}: {pool_bytes(pool, n) / GIB:.2f} GiB of weights")
            present = [c for c in cases if (REPO / "conf" / "method" / f"{c.conf}.yaml").is_file()]
            rows = merges(
                pool,
                n,
                present,
                args.runs,
                out_root,
                log,
                not args.no_warmup,
                args.reference_python,
            )
            for c in cases:
                if c not in present:
                    rows[c.label] = {
                        "missing": f"not implemented yet (no conf/method/{c.conf}.yaml)"
                    }
            results["merges"][arch][n] = rows
        if arch == "b32" and not args.no_eval:
            log("evaluation throughput")
            results["evaluation"] = evaluation(pool, args.eval_images)
    results["load_after"] = load_average()

    table = render(results)
    print(table)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = bench_root() / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stamp}.md").write_text(table)
    (out_dir / f"{stamp}.json").write_text(json.dumps(results, indent=2, default=str))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str))
    log(f"results: {out_dir / stamp}.md")
    return results


if __name__ == "__main__":
    main()
