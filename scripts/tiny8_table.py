"""Regenerate the tiny8 results table (docs/tiny8.md, between the RESULTS markers).

    python scripts/tiny8_table.py                 # every method in conf/method/
    python scripts/tiny8_table.py task_arithmetic ties_merging   # only these (others kept)
    python scripts/tiny8_table.py --table-only    # rewrite the table from the cached results
    python scripts/tiny8_table.py lora:task_arithmetic lora/core_space   # LoRA rows (tiny8_lora)
    python scripts/tiny8_table.py --build DIR [methods]   # another build (e.g. an attempt's)
    python scripts/tiny8_table.py --build DIR --seed 1 --published   # a fine-tuning seed's rows
    python scripts/tiny8_table.py --build DIR --table-only --seed-builds DIR1 DIR2   # seeds of DIR
    python scripts/tiny8_table.py --build DIR --table-only --without faces   # τ on 7 tasks

`--build DIR` runs on the checkpoints that `scripts/build_tiny8.py --out DIR` wrote (the pool's
model config, pretrained model and experts overridden), caches in DIR/tiny8_results.json and prints
the table and Kendall's τ without touching the docs. `--seed N` also records the build's averages
as fine-tuning seed N in docs/tiny8_seeds.json: the docs table then shows, per method, the mean ±
std of the test average over the shipped experts (seed 0) and every recorded seed, and Kendall's τ
on those means. `--seed-builds DIR1 DIR2` (with `--build DIR`) prints DIR's table with the same
mean ± std column and τ line over DIR and the other folders (e.g. an attempt's fine-tuning seeds),
again without touching the docs. `--published` = the methods with a published CLIP number (and the
two references).

Every method runs through the CLI on the default pool (tiny8), evaluated on validation and test.
A method's scale (a scalar `scaling_factor`, or the knob in SWEEPS: a base merge's λ, LiNeS' β)
is swept over LAMBDA_GRID (GRIDS for some) on the validation split only, and the value with the
best validation accuracy is then evaluated on test (test accuracy never selects anything). When
that value is the grid's top, the grid is continued with its last step (five values at a time, up
to twice its top) until the best value is below the top. Only the top is continued: a best value
at a grid's bottom (LiNeS' β = 0.1 and SVC's λ = 0.1 on build A2) is reported as is.
Results are cached per method in docs/tiny8_results.json so that one method can be re-run
without the others.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusion_bench.api import method_config  # noqa: E402
from fusion_bench.report import best, collect  # noqa: E402

LAMBDA_GRID = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0"
# Methods whose α multiplies a normalised or spectrum-flattened update: their papers select it
# above 1 too.
WIDE_GRID = "0.2,0.4,0.6,0.8,1.0,1.2,1.4,1.6,1.8,2.0"
GRIDS = {name: WIDE_GRID for name in ("iso_c", "iso_cts", "tsv_m", "dc_merge")}
# Methods whose swept value is not a top-level scaling_factor: (override, grid). A base merge's
# options are added with ++ where the YAML's base_options is empty.
SWEEPS = {
    "dare": ("++method.base_options.scaling_factor", LAMBDA_GRID),
    "dare_task_arithmetic": ("method.base_options.scaling_factor", LAMBDA_GRID),
    "dare_ties_merging": ("method.base_options.scaling_factor", LAMBDA_GRID),
    "svc": ("++method.base_options.scaling_factor", LAMBDA_GRID),
    "svc_tsv_m": ("++method.base_options.scaling_factor", WIDE_GRID),
    "lines": ("method.beta", LAMBDA_GRID),  # the authors tune β; α follows from the task count
}
RESULTS = ROOT / "docs" / "tiny8_results.json"
SEEDS = ROOT / "docs" / "tiny8_seeds.json"  # {seed: {method: averages}} of other expert seeds
PUBLISHED = ROOT / "docs" / "published_b32_ta8.json"  # CLIP ViT-B/32 TA8 numbers, with sources
PAGE = ROOT / "docs" / "tiny8.md"
BEGIN, END = "<!-- RESULTS:BEGIN -->", "<!-- RESULTS:END -->"
FIRST = ["pretrained", "individual", "simple_average", "task_arithmetic"]
EXTRA = {  # per-method overrides that keep the table's run time reasonable on a CPU
    name: ["method.max_steps=300"]  # the paper uses 500, FusionBench 1000
    for name in ("adamerging_task_wise", "adamerging_layer_wise", "adamerging_plusplus")
}
UNIFORM = "method.weights=[1,1,1,1,1,1,1,1]"  # methods without default weights: uniform
EXTRA.update({"weighted_average": [UNIFORM], "weighted_ensemble": [UNIFORM]})


def methods() -> list[str]:
    names = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))
    return [m for m in FIRST if m in names] + [m for m in names if m not in FIRST]


# Routed and task-id methods (conf/method/routed/): their own table, both evaluation modes.
# Only TALL masks has a knob its authors select on validation (λ_t ∈ {0.2 … 0.6}; one λ for all
# tasks here); the others run with their papers' defaults (MASS: α = 1 by design).
ROUTED_SWEEPS = {"routed/tall_masks": ("method.tall_mask_lambda", "0.2,0.3,0.4,0.5,0.6")}
ROUTED_EXTRA = {
    "routed/smile": ["method.gate_k=16", "method.k=32"],  # the paper's reported CLIP setting
    "routed/wemoe": ["method.max_steps=300"],  # as AdaMerging's rows (paper: 1000) on a CPU
}
ROUTED_BEGIN, ROUTED_END = "<!-- ROUTED:BEGIN -->", "<!-- ROUTED:END -->"
SAVED = "routed/checkpoint"  # evaluates a saved model: not a method to tabulate


# LoRA experts (modelpool=tiny8_lora): full-space rules on the expanded experts next to the same
# rules in Core Space and KnOTS. key -> (method, overrides, (swept override, grid) or None). The
# full-space TIES uses the options its Core Space version starts from (disjoint mean, top-30 %),
# so that the two rows differ only in the space.
# On build A2, LoRA updates (s = 2) selected the smallest λ of LAMBDA_GRID for task arithmetic and
# TSV-M: a grid that extends below it, so that the selected value is not at the grid's bottom (its
# top is continued like every grid's; the shipped build selects 0.5 and 0.7).
LORA_LOW_GRID = "0.02,0.05,0.1,0.15,0.2,0.3,0.5"
LORA = {
    "lora:individual": ("individual", [], None),
    "lora:task_arithmetic": ("task_arithmetic", [], ("method.scaling_factor", LORA_LOW_GRID)),
    "lora:ties_merging": (
        "ties_merging",
        ["method.merge_func=mean", "method.threshold=30"],
        ("method.scaling_factor", WIDE_GRID),
    ),
    "lora:tsv_m": ("tsv_m", [], ("method.scaling_factor", LORA_LOW_GRID)),
    "lora:iso_c": ("iso_c", [], ("method.scaling_factor", WIDE_GRID)),
    "lora/core_space": (
        "lora/core_space",
        [],
        ("++method.base_options.scaling_factor", LORA_LOW_GRID),
    ),
    "lora/core_space_ties": (
        "lora/core_space_ties",
        [],
        ("method.base_options.scaling_factor", WIDE_GRID),
    ),
    "lora/core_space_tsv_m": (
        "lora/core_space_tsv_m",
        [],
        ("method.base_options.scaling_factor", LORA_LOW_GRID),
    ),
    "lora/core_space_iso_c": (
        "lora/core_space_iso_c",
        [],
        ("method.base_options.scaling_factor", WIDE_GRID),
    ),
    "lora/knots": ("lora/knots", [], ("method.base_options.scaling_factor", WIDE_GRID)),
}
LORA_BEGIN, LORA_END = "<!-- LORA:BEGIN -->", "<!-- LORA:END -->"


def routed_methods() -> list[str]:
    folder = ROOT / "conf" / "method" / "routed"
    return sorted(f"routed/{p.stem}" for p in folder.glob("*.yaml") if f"routed/{p.stem}" != SAVED)


POOL: list[str] = []  # modelpool overrides of --build (empty: the shipped tiny8)


def build_overrides(build: Path) -> list[str]:
    """The tiny8 pool pointed at the checkpoints ``scripts/build_tiny8.py --out build`` wrote."""
    build = build.resolve()
    files = [build / "Tiny8-ViT.json", build / "pretrained.safetensors"]
    experts = sorted((build / "experts").glob("*.safetensors"))
    missing = [str(f) for f in files if not f.is_file()] + ([] if experts else [f"{build}/experts"])
    if missing:
        sys.exit(f"[tiny8_table] --build {build}: missing {', '.join(missing)}")
    return [
        f"modelpool.model_config={files[0]}",
        f"modelpool.pretrained={files[1]}",
        *(f"modelpool.finetuned.tiny8_{e.stem}={e}" for e in experts),
    ]


def cli(args: list[str], sweep_dir: str) -> list[dict]:
    """Run ``fusion_bench -m <args>`` into ``sweep_dir``; the job reports found there."""
    command = [
        sys.executable,
        "-m",
        "fusion_bench",
        "-m",
        "logger=none",
        *args,
        *POOL,
        f"hydra.sweep.dir={sweep_dir}",
    ]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"[tiny8_table] failed: {' '.join(command)}\n{proc.stderr[-3000:]}")
    return collect(Path(sweep_dir))


def sweep_of(name: str) -> tuple[str, str] | None:
    """(override, grid) swept on validation for ``name``, or None (run with its defaults)."""
    if name in SWEEPS:
        return SWEEPS[name]
    config = method_config(name)  # the YAML with the configs it extends merged in
    if isinstance(config.get("scaling_factor"), (int, float)):
        return "method.scaling_factor", GRIDS.get(name, LAMBDA_GRID)
    return None


def swept_value(row: dict, key: str) -> str:
    """The value of the swept override ``key`` in a sweep row's setting."""
    setting = row["setting"].split()
    return next(t.split("=", 1)[1] for t in setting if t.lstrip("+").startswith(key + "="))


def extension(grid: str, value: str, first: str) -> str:
    """The next values to sweep when the best ``value`` is the top of ``grid`` (the swept values
    so far end there): ``grid``'s last step continued five times, up to twice the top of the
    ``first`` grid; "" when ``value`` is interior, or that limit is reached."""
    values = [float(v) for v in grid.split(",")]
    top, limit = values[-1], 2 * max(float(v) for v in first.split(","))
    if float(value) < top or len(values) < 2 or top >= limit - 1e-9:
        return ""
    step = values[-1] - values[-2]
    more = [top + step * i for i in range(1, 6)]
    return ",".join(str(round(v, 6)) for v in more if v <= limit + 1e-9)


def run_method(name: str) -> dict:
    """Best setting by validation accuracy (a sweep on validation only of the method's scale:
    see sweep_of), then that setting evaluated on validation and test. Routed methods: their
    report's costs and evaluation mode are kept too. LoRA rows (keys of LORA) run on
    modelpool=tiny8_lora."""
    routed = name.startswith("routed/")
    if name in LORA:
        method, extra, swept = LORA[name]
        args = ["modelpool=tiny8_lora", f"method={method}", *extra]
    else:
        args = [f"method={name}", *(ROUTED_EXTRA if routed else EXTRA).get(name, [])]
        swept = ROUTED_SWEEPS.get(name) if routed else sweep_of(name)
    print(f"[tiny8_table] {name}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if swept is not None:
            override, grid = swept
            key = override.lstrip("+")
            rows, n = [], 0
            while grid:  # the grid, then its extensions while the best value is its top edge
                n += 1
                rows += cli(
                    [*args, "taskpool.splits=[validation]", f"{override}={grid}"],
                    f"{tmp}/sweep{n}",
                )
                value = swept_value(best(rows), key)
                grid = extension(grid, value, swept[1])
            args.append(f"{override}={value}")
        (row,) = cli([*args, "taskpool.splits=[validation,test]"], f"{tmp}/final")
        if routed:
            (report,) = [json.loads(p.read_text()) for p in Path(tmp, "final").rglob("report.json")]
            row |= {"costs": report.get("costs"), "evaluation": report.get("evaluation")}
    return {k: v for k, v in row.items() if k != "job"}


def routed_table(results: dict[str, dict]) -> str:
    """Task-agnostic (router) and oracle-task-id averages, routing accuracy, costs; the share of
    the experts' accuracy kept (the papers' headline) against the `individual` row."""
    experts = results.get("individual", {}).get("test/avg_acc")
    lines = [
        "| method | setting | test avg, task-agnostic | kept of experts | routing acc | "
        "test avg, oracle task id | kept of experts | val avg | stored vs θ0 | passes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def pct(value):
        return "–" if value is None else f"{100 * value:.1f}"

    def kept(value):
        return "–" if value is None or not experts else f"{100 * value / experts:.0f} %"

    for name in [m for m in routed_methods() if m in results]:
        r = results[name]
        setting = setting_of(r)
        costs = r.get("costs") or {}
        per_task = "oracle" in (r.get("evaluation") or "").split(":")[0]
        agnostic = None if per_task else r.get("test/avg_acc")
        oracle = r.get("test/avg_acc") if per_task else r.get("oracle/test/avg_acc")
        lines.append(
            f"| `{name}` | {setting} | **{pct(agnostic)}** | {kept(agnostic)} | "
            f"{pct(r.get('routing/test/avg_acc'))} | {pct(oracle)} | {kept(oracle)} | "
            f"{pct(r.get('validation/avg_acc'))} | "
            f"{costs.get('storage_vs_pretrained', float('nan')):.2f}× | "
            f"{costs.get('forward_passes_per_image', '–')} |"
        )
    return "\n".join(lines)


COMMON = ("method=", "logger=", "taskpool.splits=", "modelpool.")  # the same in every row


def setting_of(row: dict, common: tuple[str, ...] = COMMON) -> str:
    """A row's own overrides (the swept value, the method's extras), or "defaults"."""
    return " ".join(t for t in row["setting"].split() if not t.startswith(common)) or "defaults"


def per_task_table(headers: list[str], rows: list[tuple[list[str], dict]]) -> str:
    """Markdown: the leading cells of each row, its test accuracy per task, test and val average."""
    tasks = sorted(
        {
            k.split("/")[1]
            for _, r in rows
            for k in r
            if k.startswith("test/") and k.endswith("/acc")
        }
    )
    lines = [
        "| "
        + " | ".join([*headers, *(t.removeprefix("tiny8_") for t in tasks)])
        + " | test avg | val avg |",
        "|" + "---|" * (len(headers) + len(tasks) + 2),
    ]
    for lead, r in rows:
        cells = [f"{100 * r[f'test/{t}/acc']:.1f}" for t in tasks]
        lines.append(
            "| "
            + " | ".join([*lead, *cells])
            + f" | **{100 * r['test/avg_acc']:.1f}** | {100 * r['validation/avg_acc']:.1f} |"
        )
    return "\n".join(lines)


def lora_table(results: dict[str, dict]) -> str:
    """Full-space rules on the expanded LoRA experts vs Core Space / KnOTS, per task."""
    rows = []
    for key in [k for k in LORA if k in results]:
        space = "core" if "core_space" in key else "KnOTS" if "knots" in key else "full"
        if key == "lora:individual":
            space = "—"
        setting = setting_of(results[key], (*COMMON, "modelpool="))
        rows.append(([f"`{LORA[key][0]}`", space, setting], results[key]))
    return per_task_table(["method", "space", "setting"], rows) if rows else ""


def seed_averages(results: dict[str, dict], seeds: dict[str, dict]) -> dict[str, list[float]]:
    """Per method, the test averages of seed 0 (``results``) and of every recorded seed, for the
    methods that every seed has."""
    runs = [results, *seeds.values()]
    return {
        name: [run[name]["test/avg_acc"] for run in runs]
        for name in results
        if all(name in run for run in runs)
    }


def mean_std(values: list[float]) -> str:
    """``mean ± std`` in points (sample std, n − 1)."""
    import statistics

    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def table(results: dict[str, dict], seeds: dict[str, dict] | None = None) -> str:
    """The per-task table of seed 0; with recorded seeds, a last column with the mean ± std of
    the test average over every seed."""
    rows = [
        ([f"`{name}`", setting_of(results[name])], results[name])
        for name in methods()
        if name in results
    ]
    text = per_task_table(["method", "setting"], rows)
    if not seeds:
        return text
    averages = seed_averages(results, seeds)
    header, rule, *body = text.split("\n")
    n = 1 + len(seeds)
    lines = [header + f" test avg, {n} seeds |", rule + "---|"]
    for (lead, _), line in zip(rows, body, strict=True):
        name = lead[0].strip("`")
        lines.append(line + (f" {mean_std(averages[name])} |" if name in averages else " – |"))
    return "\n".join(lines)


def kendall(ours: dict[str, float], published: dict[str, dict]) -> tuple[float, int, int, list]:
    """Kendall's τ-b between ``ours`` and the published averages over the methods both have, with
    the concordant and discordant pair counts and the methods' names."""
    from scipy.stats import kendalltau

    names = [n for n in methods() if n in ours and n in published]
    mine = [ours[n] for n in names]
    theirs = [published[n]["acc"] for n in names]
    pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    sign = [(mine[i] - mine[j]) * (theirs[i] - theirs[j]) for i, j in pairs]
    tau = kendalltau(mine, theirs).statistic if len(names) >= 3 else float("nan")
    return tau, sum(s > 0 for s in sign), sum(s < 0 for s in sign), names


def agreement(
    results: dict[str, dict], seeds: dict[str, dict] | None = None, base: str = "0"
) -> str:
    """The ranking-agreement line: Kendall's τ (τ-b) between tiny8's test averages and the
    published CLIP ViT-B/32 TA8 averages, over every merge method that has both; with recorded
    seeds, τ of the seeds' mean averages and τ per seed (mean ± std). ``base`` names the seed of
    ``results`` in that line."""
    published = json.loads(PUBLISHED.read_text())["methods"]
    tau, concordant, discordant, names = kendall(
        {n: r["test/avg_acc"] for n, r in results.items()}, published
    )
    if len(names) < 3:
        return ""
    line = (
        f"\nRanking agreement with CLIP ViT-B/32 on TA8 (published averages, "
        f"`docs/published_b32_ta8.json`), over the {len(names)} merge methods with a published "
        f"number: **Kendall τ = {tau:.2f}** ({concordant} concordant, {discordant} discordant "
        f"pairs; {', '.join(f'`{n}`' for n in names)})."
    )
    if not seeds:
        return line
    import statistics

    averages = seed_averages(results, seeds)
    mean_tau, c, d, common = kendall(
        {n: statistics.mean(v) for n, v in averages.items()}, published
    )
    per_seed = [
        kendall({n: run[n]["test/avg_acc"] for n in common}, published)[0]
        for run in [results, *seeds.values()]
    ]
    return line + (
        f" Over {1 + len(seeds)} fine-tuning seeds ({', '.join([base, *seeds])}; the {len(common)} "
        f"methods every seed has): τ of the mean averages **{mean_tau:.2f}** ({c} concordant, "
        f"{d} discordant); τ per seed {statistics.mean(per_seed):.2f} ± "
        f"{statistics.stdev(per_seed):.2f} ({', '.join(f'{t:.2f}' for t in per_seed)})."
    )


def published_methods() -> list[str]:
    """The methods with a published CLIP ViT-B/32 TA8 number, plus zero-shot and the experts."""
    published = json.loads(PUBLISHED.read_text())["methods"]
    return [n for n in methods() if n in published or n in ("pretrained", "individual")]


def without(results: dict[str, dict], task: str) -> dict[str, dict]:
    """``results`` with ``task``'s column removed and the test average taken over the other
    tasks (a diagnostic of how much one task moves the ranking; the docs table keeps all eight)."""
    column = f"test/tiny8_{task}/acc"
    out = {}
    for name, row in results.items():
        if column not in row:
            sys.exit(f"[tiny8_table] --without {task}: {name} has no {column}")
        kept = {k: v for k, v in row.items() if k != column}
        tasks = [v for k, v in kept.items() if k.startswith("test/tiny8_") and k.endswith("/acc")]
        out[name] = kept | {"test/avg_acc": sum(tasks) / len(tasks)}
    return out


def read_json(path: Path) -> dict:
    """A results cache, or {} before its first run."""
    return json.loads(path.read_text()) if path.is_file() else {}


def main(argv: list[str]) -> None:
    """``--table-only``: rewrite the table from the cached results, running nothing."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("methods", nargs="*", help="method keys (default: all)")
    ap.add_argument("--table-only", action="store_true", help="run nothing, rewrite the docs")
    ap.add_argument("--build", type=Path, help="a build_tiny8.py --out directory")
    ap.add_argument("--seed", help="with --build: record its averages as this fine-tuning seed")
    ap.add_argument("--published", action="store_true", help="only published_methods()")
    ap.add_argument(
        "--seed-builds",
        type=Path,
        nargs="+",
        default=[],
        metavar="DIR",
        help="with --build: other fine-tuning seeds of that build (their tiny8_results.json), "
        "printed as mean ± std and τ over the seeds",
    )
    ap.add_argument(
        "--without",
        metavar="TASK",
        help="with --build --table-only: print the table and τ with the test average over the "
        "other tasks (e.g. faces, 80 test images)",
    )
    args = ap.parse_args(argv)
    if args.without and not (args.build and args.table_only):
        sys.exit("[tiny8_table] --without needs --build and --table-only (a printed diagnostic)")
    if args.seed is not None and args.build is None:
        sys.exit("[tiny8_table] --seed needs --build (the seed's build directory)")
    if args.seed_builds and args.build is None:
        sys.exit("[tiny8_table] --seed-builds needs --build (the seeds' first build directory)")
    others = {}
    for folder in args.seed_builds:
        others[folder.name] = read_json(folder / "tiny8_results.json")
        if not others[folder.name]:
            sys.exit(f"[tiny8_table] --seed-builds {folder}: no tiny8_results.json (run --build)")
    cache = RESULTS
    if args.build is not None:
        POOL[:] = build_overrides(args.build)
        cache = args.build / "tiny8_results.json"
    results, seeds = read_json(cache), read_json(SEEDS)
    names = args.methods or (
        published_methods()
        if args.published
        else methods() + ([] if args.build else routed_methods() + list(LORA))
    )
    for name in [] if args.table_only else names:
        results[name] = run_method(name)
        cache.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    if args.build is not None:
        if args.seed is not None:
            seeds[args.seed] = {
                n: {
                    "test/avg_acc": r["test/avg_acc"],
                    "validation/avg_acc": r["validation/avg_acc"],
                    "setting": setting_of(r),
                }
                for n, r in results.items()
            }
            SEEDS.write_text(json.dumps(seeds, indent=1, sort_keys=True) + "\n")
        if args.without:
            results = without(results, args.without)
            others = {k: without(v, args.without) for k, v in others.items()}
        print(table(results, others) + agreement(results, others, args.build.name))
        return
    text = PAGE.read_text()
    for begin, end, body in (
        (BEGIN, END, table(results, seeds) + agreement(results, seeds)),
        (ROUTED_BEGIN, ROUTED_END, routed_table(results)),
        (LORA_BEGIN, LORA_END, lora_table(results)),
    ):
        if begin not in text:
            text += f"\n{begin}\n{end}\n"
        head, rest = text.split(begin)
        _, tail = rest.split(end)
        text = f"{head}{begin}\n{body}\n{end}{tail}"
    PAGE.write_text(text)
    print(table(results, seeds) + agreement(results, seeds))
    print(routed_table(results))
    print(lora_table(results))


if __name__ == "__main__":
    main(sys.argv[1:])
