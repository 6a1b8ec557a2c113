"""The embedded tiny8 benchmark: artefacts present and consistent, and the default job runs."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from fusion_bench.paths import config_dir
from fusion_bench.runner import validate_pool
from tests.test_cli import run_cli


def default_config(*overrides: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        return compose("config", overrides=list(overrides))


def test_defaults_are_task_arithmetic_on_tiny8():
    cfg = default_config()
    assert cfg.modelpool.model_name == "Tiny8-ViT"
    assert len(cfg.suite.tasks) == 8 and all(t.startswith("tiny8_") for t in cfg.suite.tasks)
    assert cfg.method._target_.endswith("TaskArithmetic")


def test_tiny8_pool_and_datasets_are_consistent():
    cfg = default_config("logger=none")
    pool = instantiate(cfg.modelpool, _convert_="all")
    validate_pool(pool)  # 8 experts of the pretrained architecture, no NaN in headers' shapes
    taskpool = instantiate(cfg.taskpool, _convert_="all")
    for task in taskpool.tasks:
        spec = taskpool.data.spec(task)
        sizes = {}
        for split in ("train", "validation", "test"):
            ds = taskpool.data.load_split(task, split, taskpool.max_samples_per_task)
            labels = set(ds[spec.label_column])
            assert labels <= set(range(spec.num_classes)), (task, split)
            sizes[split] = len(ds)
        assert sizes["test"] >= 50 and sizes["train"] >= sizes["test"] / 2, (task, sizes)
        names = ds.features[spec.label_column].names
        assert list(names) == list(spec.classnames), task  # readable class names, same order


def test_default_job_fast_dev_run(tmp_path, capsys):
    code, out, err = run_cli(
        ["logger=none", "fast_dev_run=true", f"hydra.run.dir={tmp_path}"], capsys
    )
    assert code == 0, err
    assert "== task_arithmetic ==" in out and "tiny8_faces" in out
    assert "fast_dev_run: one batch per task" in out  # labelled: not a result
    # the pool loads its weights: open_clip's "initialized randomly" warning would mislead
    log = (tmp_path / "cli.log").read_text() + err
    assert "No pretrained weights loaded" not in log


def test_scratch_towers_are_differently_initialised_tiny8_towers():
    """The issue-15 pool of towers trained from random initialisations: three of the tiny8
    architecture (same keys and shapes as the pretrained tower, different weights) and one of
    width 128 (same keys, narrower), shipped with its open_clip config."""
    import json

    from fusion_bench.checkpoint import LazyStateDict
    from fusion_bench.paths import resolve_path

    cfg = default_config("logger=none")
    pretrained = instantiate(cfg.modelpool, _convert_="all").pretrained()
    folder = Path(resolve_path("fusion_bench:tiny8/scratch"))
    towers = {s: LazyStateDict([folder / f"{s}.safetensors"]) for s in ("seed0", "seed1", "seed2")}
    for tower in towers.values():
        assert {k: tower.shape(k) for k in tower} == {k: pretrained.shape(k) for k in pretrained}
    key = "transformer.resblocks.0.mlp.c_fc.weight"
    assert not torch.equal(towers["seed0"][key], towers["seed1"][key])
    narrow = LazyStateDict([folder / "w128_seed3.safetensors"])
    assert set(narrow) == set(pretrained) and narrow.shape(key) == (512, 128)
    config = json.loads((folder / "Tiny8-ViT-w128.json").read_text())
    assert config["vision_cfg"]["width"] == 128


def _script(name: str):
    """``scripts/<name>.py`` as a module (the scripts are not a package)."""
    import importlib.util

    from fusion_bench.paths import config_dir

    path = config_dir().parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ranking_agreement_line_is_kendalls_tau_over_published_methods():
    """The line under the tiny8 table (issue 17): τ over the methods with a published number; a
    tiny8 ranking equal to the published one gives τ = 1, the reversed one τ = −1."""
    import json

    from fusion_bench.paths import config_dir

    table = _script("tiny8_table")
    published = json.loads(table.PUBLISHED.read_text())["methods"]
    for name, entry in published.items():  # every entry names a method config and its source
        assert (config_dir() / "method" / f"{name}.yaml").is_file(), name
        assert entry["source"] and 0 < entry["acc"] < 100
    same = {n: {"test/avg_acc": e["acc"] / 100} for n, e in published.items()}
    assert "Kendall τ = 1.00" in table.agreement(same)
    assert f"over the {len(published)} merge methods" in table.agreement(same)
    reversed_ = {n: {"test/avg_acc": 1 - e["acc"] / 100} for n, e in published.items()}
    assert "Kendall τ = -1.00" in table.agreement(reversed_)


def test_seed_column_and_tau_are_over_every_recorded_seed():
    """With recorded fine-tuning seeds the table gains a mean ± std column (sample std over seed 0
    and the recorded seeds, only for methods every seed has) and the τ line the τ of the means and
    per seed: equal rankings in two seeds and the reversed one in the third give per-seed τ 1, 1,
    −1; the means (weighted by the larger margins of the agreeing seeds) keep τ = 1."""
    import json

    table = _script("tiny8_table")
    published = json.loads(table.PUBLISHED.read_text())["methods"]
    same = {n: {"test/avg_acc": e["acc"] / 100} for n, e in published.items()}
    flipped = {n: {"test/avg_acc": 0.9 - e["acc"] / 400} for n, e in published.items()}
    seeds = {"1": same, "2": flipped}
    line = table.agreement(same, seeds)
    assert "τ of the mean averages **1.00**" in line
    assert "τ per seed 0.33 ± 1.15 (1.00, 1.00, -1.00)" in line
    rows = {"task_arithmetic": {"test/avg_acc": 0.60, "validation/avg_acc": 0.6, "setting": ""}}
    rows["simple_average"] = {"test/avg_acc": 0.58, "validation/avg_acc": 0.6, "setting": ""}
    for r in rows.values():
        r["test/tiny8_x/acc"] = r["test/avg_acc"]
    seeds = {
        "1": {"task_arithmetic": {"test/avg_acc": 0.62}},
        "2": {"task_arithmetic": {"test/avg_acc": 0.64}},
    }
    text = table.table(rows, seeds)
    assert text.splitlines()[0].endswith("| test avg, 3 seeds |")
    ta = next(line for line in text.splitlines() if "`task_arithmetic`" in line)
    assert ta.endswith("| 62.0 ± 2.0 |")  # mean of 60, 62, 64; sample std 2
    sa = next(line for line in text.splitlines() if "`simple_average`" in line)
    assert sa.endswith("| – |")  # not in every seed
    assert table.table(rows) == table.table(rows, {})  # no seeds: the seed-0 table unchanged


def test_sweep_grid_is_continued_while_the_best_value_is_its_top_edge(monkeypatch):
    """A validation accuracy that peaks at λ = 1.4 (above LAMBDA_GRID's top, 1.0): the sweep
    continues the grid (1.1–1.5) and selects 1.4 for the final run; a peak inside the grid sweeps
    only the grid; a curve that still rises at twice the top stops there (2.0)."""
    table = _script("tiny8_table")

    def run(peak):
        sweeps = []

        def fake_cli(args, sweep_dir):
            (swept,) = [a for a in args if a.startswith("method.scaling_factor=")]
            values = swept.split("=", 1)[1].split(",")
            if "taskpool.splits=[validation]" in args:
                sweeps.append(values)
                return [
                    {
                        "setting": f"method.scaling_factor={v}",
                        "validation/avg_acc": -abs(float(v) - peak),
                    }
                    for v in values
                ]
            return [{"setting": swept, "test/avg_acc": 0.5, "validation/avg_acc": 0.5}]

        monkeypatch.setattr(table, "cli", fake_cli)
        row = table.run_method("task_arithmetic")
        return sweeps, row["setting"]

    sweeps, setting = run(1.4)
    assert sweeps == [table.LAMBDA_GRID.split(","), ["1.1", "1.2", "1.3", "1.4", "1.5"]]
    assert setting == "method.scaling_factor=1.4"
    sweeps, setting = run(0.3)
    assert len(sweeps) == 1 and setting == "method.scaling_factor=0.3"
    sweeps, setting = run(5.0)
    assert sweeps[-1] == ["1.6", "1.7", "1.8", "1.9", "2.0"] and setting.endswith("=2.0")
    assert table.extension(table.WIDE_GRID, "2.0", table.WIDE_GRID) == "2.2,2.4,2.6,2.8,3.0"


def test_seed_builds_print_mean_std_and_tau_over_the_folders(tmp_path, capsys):
    """``--build DIR --table-only --seed-builds DIR1 DIR2``: DIR's table with the mean ± std
    column over the three folders' cached results and the τ line naming them; docs untouched; a
    folder without results is a clear error."""
    import json

    import pytest

    table = _script("tiny8_table")
    published = json.loads(table.PUBLISHED.read_text())["methods"]
    folders = []
    for i, name in enumerate(["a7", "a7s1", "a7s2"]):
        folder = tmp_path / name
        (folder / "experts").mkdir(parents=True)
        for f in ("Tiny8-ViT.json", "pretrained.safetensors", "experts/tiny8_x.safetensors"):
            (folder / f).write_text("")
        results = {
            n: {
                "test/avg_acc": e["acc"] / 100 + i / 100,
                "validation/avg_acc": 0.5,
                "test/tiny8_x/acc": 0.5,
                "setting": "",
            }
            for n, e in published.items()
        }
        (folder / "tiny8_results.json").write_text(json.dumps(results))
        folders.append(str(folder))
    page = table.PAGE.read_text()
    table.main(["--build", folders[0], "--table-only", "--seed-builds", *folders[1:]])
    out = capsys.readouterr().out
    assert table.PAGE.read_text() == page
    ta = next(line for line in out.splitlines() if "`task_arithmetic`" in line)
    acc = published["task_arithmetic"]["acc"]
    assert ta.endswith(f"| {acc + 1:.1f} ± 1.0 |")  # acc, acc + 1, acc + 2
    assert "Over 3 fine-tuning seeds (a7, a7s1, a7s2;" in out
    assert "τ per seed 1.00 ± 0.00" in out
    with pytest.raises(SystemExit, match="no tiny8_results.json"):
        table.main(["--build", folders[0], "--table-only", "--seed-builds", str(tmp_path)])


def test_without_a_task_recomputes_the_average_over_the_others():
    """``--without faces``: the faces column leaves every row and the test average is the mean of
    the remaining tasks; a row without that task's column is a clear error."""
    import pytest

    table = _script("tiny8_table")
    row = {"test/tiny8_a/acc": 0.6, "test/tiny8_b/acc": 0.8, "test/tiny8_faces/acc": 0.1}
    row |= {"test/avg_acc": 0.5, "validation/avg_acc": 0.4, "setting": ""}
    (out,) = table.without({"m": row}, "faces").values()
    assert "test/tiny8_faces/acc" not in out
    assert abs(out["test/avg_acc"] - 0.7) < 1e-12 and out["validation/avg_acc"] == 0.4
    with pytest.raises(SystemExit, match="m has no test/tiny8_skintone/acc"):
        table.without({"m": row}, "skintone")


def test_build_overrides_point_the_pool_at_a_build_directory(tmp_path):
    """``tiny8_table.py --build DIR``: the pool's config, pretrained model and every expert come
    from DIR (here the shipped build itself, so the overridden pool equals the default one); a
    directory without a build is a clear error naming what is missing."""
    import pytest

    table = _script("tiny8_table")
    shipped = config_dir().parent / "fusion_bench" / "data" / "tiny8"
    overrides = table.build_overrides(shipped)
    assert len([o for o in overrides if o.startswith("modelpool.finetuned.")]) == 8
    cfg = default_config("logger=none", *overrides)
    default = instantiate(default_config("logger=none").modelpool, _convert_="all")
    pool = instantiate(cfg.modelpool, _convert_="all")
    assert sorted(pool.expert_names) == sorted(default.expert_names)
    key = "transformer.resblocks.0.mlp.c_fc.weight"
    assert torch.equal(pool.expert("tiny8_mnist")[key], default.expert("tiny8_mnist")[key])
    with pytest.raises(SystemExit, match="missing .*Tiny8-ViT.json"):
        table.build_overrides(tmp_path)


def test_low_rank_diagnostic_is_the_best_rank_r_over_t_task_matrix():
    """tiny8_diagnostics' low-rank column (issue 17): every 2-D task matrix becomes its best
    rank-⌊r/T⌋ approximation (Eckart–Young: the float64 SVD truncated), at a realistic shape with
    an ill-conditioned spectrum; other tensors and the averaged text projection keep their whole
    task vector; the reported share is the kept squared singular values over ‖τ‖²."""
    import torch

    diagnostics = _script("tiny8_diagnostics")
    gen = torch.Generator().manual_seed(0)
    m, n, n_tasks = 384, 1536, 8
    q1, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, m, generator=gen, dtype=torch.float64))
    spectrum = torch.logspace(0, -8, m, dtype=torch.float64)
    tau = (q1 * spectrum) @ q2.T
    theta0 = {
        "w": torch.randn(m, n, generator=gen),
        "b": torch.randn(m, generator=gen),
        "text_projection": torch.randn(16, 8, generator=gen),
    }
    expert = {
        "w": (theta0["w"].double() + tau).float(),
        "b": theta0["b"] + 1.0,
        "text_projection": theta0["text_projection"] + 2.0,
    }
    state, share = diagnostics.low_rank_task_vector(theta0, expert, n_tasks)
    k = m // n_tasks
    u, s, vh = torch.linalg.svd(expert["w"].double() - theta0["w"].double(), full_matrices=False)
    oracle = theta0["w"].double() + (u[:, :k] * s[:k]) @ vh[:k]
    torch.testing.assert_close(state["w"].double(), oracle.float().double(), atol=2e-6, rtol=0)
    assert torch.equal(state["b"], expert["b"])
    assert torch.equal(state["text_projection"], expert["text_projection"])
    assert abs(share - float((s[:k] ** 2).sum() / (s**2).sum())) < 1e-9
    assert 0.9 < share < 1.0  # the spectrum decays: most, not all, of ‖τ‖² is kept


def test_build_script_refuses_an_unknown_task_by_name(capsys):
    """`build_tiny8.py --tasks` (split the expert fine-tuning over processes) names a typo and the
    valid tasks before any stage runs."""
    import pytest

    build = _script("build_tiny8")
    with pytest.raises(SystemExit):
        build.main(["--stage", "finetune", "--tasks", "mnist,fashon"])
    err = capsys.readouterr().err
    assert "unknown task(s) fashon" in err and "fashion, mnist, letters" in err
    with pytest.raises(SystemExit):  # the other stages do every task: not silently ignored
        build.main(["--stage", "all", "--tasks", "mnist"])
    assert "--tasks applies to --stage finetune only" in capsys.readouterr().err
