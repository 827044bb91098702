"""benchmarks/experiment.py: experiments kept as data, their tables rendered from their rows."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

RESULTS = REPO / "benchmarks" / "results"
EXPERIMENTS = sorted(path.parent for path in RESULTS.rglob("experiment.yaml"))


def load_script():
    spec = importlib.util.spec_from_file_location("experiment", REPO / "benchmarks" / "experiment.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def cells(table: str, label: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip().strip("|").split("|")]


@pytest.mark.parametrize("folder", EXPERIMENTS, ids=[str(f.relative_to(RESULTS)) for f in EXPERIMENTS])
def test_each_committed_table_is_what_its_rows_render(folder):
    """table.md is never edited by hand: it is exactly what experiment.yaml and results.jsonl give."""
    experiment = load_script()
    assert (folder / "table.md").read_text() == experiment.render(folder), (
        f"{folder}/table.md differs from its rows: run `python benchmarks/experiment.py render {folder}`")


def test_the_cifar10_table_renders_the_figures_it_stated():
    """The 2026-12-03 table, now data: the same figures as the table the former script wrote."""
    experiment = load_script()
    text = experiment.render(RESULTS / "cifar10" / "2026-12-03-2core-amd-epyc")
    assert cells(text, "x0.5 distilled, live teacher")[1:5] == ["fastkd", "dali-cpu", "paths", "54.20 ± 1.30"]
    mixup = cells(text, "x0.5 distilled with mixup (alpha 1), live teacher")
    assert mixup[4] == "48.15 ± 5.45" and mixup[6] == ""  # no train-val gap: a mixed image's label is no target
    ema = cells(text, "the same runs' EMA of the weights (model.ema_decay 0.999)")
    assert ema[4:6] == ["46.36 ± 2.16", "48.28 / 44.02 / 46.79"] and ema[3] == ""
    for line in ("- fastkd distillation gain, dali-cpu (kd live - alone): +2.89 points, two standard errors 2.35: "
                 "beyond seed noise",
                 "- fastkd - original, distilled (teacher cache): -0.49 points, two standard errors 2.13: within seed "
                 "noise",
                 "- timm student: EMA - raw weights (same runs, paired by seed): -0.02 points, two standard errors "
                 "0.25: within seed noise",
                 "- mixup - plain KD, live teacher: -6.06 points, two standard errors 6.47: within seed noise",
                 "- Seed noise: pooled standard deviation 2.13 points over 12 rows (groups core, paths, original, "
                 "variants); with 3 seeds a difference of two rows' means is resolved beyond two standard errors "
                 "from 3.48 points."):
        assert line in text.splitlines(), line
    walls = [line for line in text.splitlines() if line.startswith("- Wall time")]
    assert [w.split("): ")[1] for w in walls] == [
        "84.3 min.", "83.0 min (0.98 of original scripts: teacher, student alone, distilled).", "131.3 min."]


def test_the_clipping_study_renders_the_figures_it_stated():
    experiment = load_script()
    text = experiment.render(RESULTS / "cifar10" / "2026-12-04-mixup-grad-clip")
    assert cells(text, "KD + mixup, optim.grad_clip_norm=2.0")[2:4] == ["55.30 ± 0.47", "54.98 / 55.09 / 55.84"]
    assert "- clipped - unclipped mixup: +7.16 points, two standard errors 6.31: beyond seed noise" in text
    assert "- clipped - unclipped mixup (paired by seed): +7.16 points, two standard errors 5.88: beyond seed noise" in text
    assert "- clipped mixup - plain KD: +1.10 points, two standard errors 1.59: within seed noise" in text
    assert "Seed noise" not in text  # `noise: []`: three recipes, no pooled noise


def write_experiment(folder: Path, rows: list[dict], **more) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"title": "t", "question": "q", "recipe": "r", "machine": "m", "seeds": [0, 1, 2], "rows": rows, **more}
    (folder / "experiment.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return folder


def write_results(folder: Path, values: dict[str, list[float]], seconds: float = 60.0) -> None:
    (folder / "results.jsonl").write_text("".join(
        json.dumps({"row": row, "seed": seed, "best_val_top1": v, "command_seconds": seconds, "git": "abc"}) + "\n"
        for row, vs in values.items() for seed, v in enumerate(vs)))


def test_seed_noise_and_walls_are_summed_by_recipe_group(tmp_path):
    """Noise pools the named groups' rows only; a wall sums its groups' runs, never a `runs_of` row."""
    experiment = load_script()
    rows = [{"name": "a", "group": "g", "command": "x"}, {"name": "b", "group": "g", "command": "x"},
            {"name": "wild", "group": "other", "command": "x"}, {"name": "a-ema", "runs_of": "a"}]
    folder = write_experiment(tmp_path / "e", rows, noise=["g"],
                              walls=[{"what": "g", "groups": ["g"]}, {"what": "all", "groups": ["g", "other"],
                                                                     "ratio_to": "g"}])
    write_results(folder, {"a": [50.0, 52.0, 54.0], "b": [60.0, 61.0, 62.0], "wild": [10.0, 50.0, 90.0]})
    text = experiment.render(folder)
    # sd of a = 2, of b = 1: pooled sqrt((4 + 1) / 2); the wild row (another recipe) is left out
    assert "pooled standard deviation 1.58 points over 2 rows (groups g)" in text
    assert "- Wall time, g (groups g): 6.0 min." in text  # 6 runs x 60 s; a-ema's runs are a's
    assert "- Wall time, all (groups g, other): 9.0 min (1.50 of g)." in text
    spec = yaml.safe_load((folder / "experiment.yaml").read_text())
    (folder / "experiment.yaml").write_text(yaml.safe_dump({**spec, "noise": []}))
    assert "Seed noise" not in experiment.render(folder)


@pytest.mark.parametrize("problem, change, message", [
    ("unknown compare row", {"compare": [["a", "nope", "x"]]}, r"compare\[0\]: 'nope' is no row"),
    ("unknown noise group", {"noise": ["nope"]}, r"noise: 'nope' is no row's group \(groups: g\)"),
    ("ratio to nothing", {"walls": [{"what": "w", "groups": ["g"], "ratio_to": "v"}]},
     r"walls\[0\]: ratio_to 'v' is no earlier wall's `what`"),
    ("a row twice", {"rows": [{"name": "a", "group": "g", "command": "x"}] * 2}, r"rows: the name\(s\) a more than once"),
    ("a typo in a row", {"rows": [{"name": "a", "group": "g", "comand": "x"}]},
     r"rows\[0\] \(a\): give a `command`, or `runs_of` another row"),
])
def test_an_experiment_whose_names_do_not_meet_is_refused_by_key(tmp_path, problem, change, message):
    experiment = load_script()
    folder = write_experiment(tmp_path / "e", [{"name": "a", "group": "g", "command": "x"}])
    spec = yaml.safe_load((folder / "experiment.yaml").read_text())
    (folder / "experiment.yaml").write_text(yaml.safe_dump({**spec, **change}))
    with pytest.raises(SystemExit, match=message):
        experiment.render(folder)


def fake_run(name: str, value_of_seed: str) -> dict:
    """A row whose command writes a run folder's summary.json (no training)."""
    code = ("import json, pathlib, sys; d = pathlib.Path(sys.argv[1]); d.mkdir(parents=True); "
            f"(d / 'summary.json').write_text(json.dumps(dict(best_val_top1={value_of_seed}, wall_seconds=1.0)))")
    return {"name": name, "group": "g", "command": f'python -c "{code}" {{out}}/runs/{name}-s{{seed}}',
            "run": f"{name}-s{{seed}}"}


def test_run_records_each_row_and_seed_once_and_goes_on_where_it_stopped(tmp_path):
    experiment = load_script()
    rows = [fake_run("a", "50 + int(sys.argv[1][-1])"), {**fake_run("t", "70"), "once": True},
            {"name": "fails", "group": "g", "command": "python -c 'raise SystemExit(3)'"}]
    folder = write_experiment(tmp_path / "e", rows)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"fails seed 0 failed \(exit 3\): see .*fails-s0.log"):
        experiment.run(folder, data=tmp_path, out=out, only=[], seeds=None)
    _, results = experiment.load(folder)
    assert [(r["row"], r["seed"], r["best_val_top1"]) for r in results] == [("a", 0, 50), ("t", 0, 70)]
    assert "$ " in (out / "logs" / "a-s0.log").read_text()
    experiment.run(folder, data=tmp_path, out=out, only=["a", "t"], seeds=None)  # a's seed 0 is not run again
    _, results = experiment.load(folder)
    assert [(r["row"], r["seed"], r["best_val_top1"]) for r in results] == [
        ("a", 0, 50), ("t", 0, 70), ("a", 1, 51), ("a", 2, 52)]  # `once`: t at the first seed only
    assert all(r["command_seconds"] > 0 and r["git"] for r in results)
    assert cells((folder / "table.md").read_text(), "a")[2] == "51.00 ± 1.00"
    with pytest.raises(SystemExit, match="--only: no such row with a command: nope"):
        experiment.run(folder, data=tmp_path, out=out, only=["nope"], seeds=None)


def test_a_command_needing_a_variable_not_given_names_it(tmp_path):
    experiment = load_script()
    folder = write_experiment(tmp_path / "e", [{"name": "orig", "group": "g",
                                                "command": "python x.py --original {original} --seed {seed}"}])
    with pytest.raises(SystemExit, match=r"row orig: its command needs --var original=VALUE"):
        experiment.run(folder, data=tmp_path, out=tmp_path / "out", only=[], seeds=None)
    assert not (folder / "results.jsonl").exists()
    words = experiment.command_of(yaml.safe_load((folder / "experiment.yaml").read_text())["rows"][0], 1, tmp_path,
                                  tmp_path, original="/src")
    assert words == [sys.executable, "x.py", "--original", "/src", "--seed", "1"]


def test_an_unfinished_fastkd_run_resumes_and_one_without_a_checkpoint_starts_again(tmp_path):
    experiment = load_script()
    command = [sys.executable, "-m", "fastkd", "distill", "--config", "c.yaml"]
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "last.pt").write_bytes(b"")
    assert experiment.resumed(command, killed) == [*command, "--resume"]
    early = tmp_path / "early"
    early.mkdir()
    (early / "config.yaml").write_text("")
    assert experiment.resumed(command, early) == command and not early.exists()
    assert experiment.resumed(command, tmp_path / "new") == command
