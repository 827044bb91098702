"""Experiments kept as data: a folder under benchmarks/results/ holds `experiment.yaml` (the
question, the machine, its rows), `results.jsonl` (one line per run: row, seed, what its run
reported, its wall time, the commit) and `table.md`, rendered from the two, never edited by hand.

    python benchmarks/experiment.py run    FOLDER --data DATA --out OUT [--var NAME=VALUE ...] [--only ROW ...]
                                           [--seeds 0 1 2]
    python benchmarks/experiment.py render FOLDER

A row of `experiment.yaml`:

    - name: kd-live            # how comparisons and results name it
      label: x0.5 distilled, live teacher
      group: student           # recipe group: seed noise is pooled over a group's rows
      command: fastkd distill --config configs/cifar10/kd.yaml run.name=kd-s{seed} ...
      run: kd-s{seed}          # the run folder under {out}/runs whose summary.json holds the result
                               # (none: the command is timed only, e.g. recording a teacher cache)
      once: true               # runs once (seed 0 only), e.g. a teacher all seeds share
      gap: false               # no train-val gap column (mixed images: a hard label is not the target)
      system: fastkd           # a value for each of the experiment's `columns` (optional)
    - name: timm-ema           # a row of the same runs' other figure: no command of its own
      label: the same runs' EMA of the weights
      runs_of: timm
      metric: best_ema_val_top1

`{seed}`, `{data}`, `{out}` and any `--var NAME=VALUE` in a command are filled in; `fastkd` is
`python -m fastkd` of this checkout, `python` this interpreter. The experiment also lists:

- `columns: [name, ...]`: extra table columns before the figures, each row giving its value;

- `compare: [[a, b, "what it asks"(, paired)], ...]`: differences the table states, each with two
  standard errors (Welch's, or of the per-seed differences when `paired`) and whether it is beyond
  seed noise;
- `noise: [group, ...]`: the recipe groups whose rows' seed spread is pooled into one standard
  deviation (rows of other groups, or of none, are other recipes or the same runs again; `[]`:
  none; left out: every group);
- `walls: [{what, groups, ratio_to}]`: wall time summed over every run of the given groups, and its
  ratio to another such sum.

Runs are resumable: a row and seed already in results.jsonl is not run again; a fastkd run
killed after its first checkpoint goes on with `--resume` (its wall time then counts the last
attempt only), one killed before it starts again. A record's `wall s per run` is the command's
wall time as this script measured it (process start-up, data pipelines, evaluation included);
records imported from before this script have the run's own `wall_seconds` where no command was
timed.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import string
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULT_KEYS = ("best_val_top1", "final_val_top1", "train_val_gap", "images_per_sec", "train_seconds", "wall_seconds",
               "best_ema_val_top1", "final_ema_val_top1")

ROW_KEYS = {"name", "label", "group", "command", "run", "once", "gap", "runs_of", "metric"}


def check(spec: dict[str, Any], where: Path) -> None:
    """Refuse an experiment whose names do not meet: each message names the key at fault."""
    def fail(message: str) -> None:
        raise SystemExit(f"{where}: {message}")

    for key in ("title", "question", "recipe", "machine", "seeds", "rows"):
        if key not in spec:
            fail(f"no `{key}`")
    names = [row.get("name") for row in spec["rows"]]
    for i, row in enumerate(spec["rows"]):
        if not row.get("name"):
            fail(f"rows[{i}]: no `name`")
        if ("command" in row) == ("runs_of" in row):
            fail(f"rows[{i}] ({row['name']}): give a `command`, or `runs_of` another row, not both or neither")
        if "runs_of" in row and row["runs_of"] not in names:
            fail(f"rows[{i}] ({row['name']}): runs_of {row['runs_of']!r} is no row")
        unknown = sorted(set(row) - ROW_KEYS - set(spec.get("columns", [])))
        if unknown:
            fail(f"rows[{i}] ({row['name']}): unknown key(s) {', '.join(unknown)}")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        fail(f"rows: the name(s) {', '.join(twice)} more than once")
    for i, (a, b, *_) in enumerate(spec.get("compare", [])):
        for name in (a, b):
            if name not in names:
                fail(f"compare[{i}]: {name!r} is no row")
    groups = {row.get("group") for row in spec["rows"]} - {None}
    for i, wall in enumerate(spec.get("walls", [])):
        for group in [*wall["groups"], *spec.get("noise", [])]:
            if group not in groups:
                fail(f"walls[{i}] / noise: {group!r} is no row's group (groups: {', '.join(sorted(groups))})")
        if "ratio_to" in wall and wall["ratio_to"] not in [w["what"] for w in spec["walls"][:i]]:
            fail(f"walls[{i}]: ratio_to {wall['ratio_to']!r} is no earlier wall's `what`")
    for group in spec.get("noise", []):
        if group not in groups:
            fail(f"noise: {group!r} is no row's group (groups: {', '.join(sorted(groups))})")


def load(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    spec = yaml.safe_load((folder / "experiment.yaml").read_text())
    check(spec, folder / "experiment.yaml")
    path = folder / "results.jsonl"
    results = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return spec, results


def git_revision() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    return done.stdout.strip() + ("-dirty" if dirty else "")


def command_of(row: dict[str, Any], seed: int, data: Path, out: Path, **variables: str) -> list[str]:
    known = {"seed": seed, "data": data, "out": out, **variables}
    missing = sorted({field for _, field, _, _ in string.Formatter().parse(row["command"])
                      if field and field not in known})
    if missing:
        raise SystemExit(f"row {row['name']}: its command needs {', '.join(f'--var {m}=VALUE' for m in missing)} "
                         "(or leave the row out with --only)")
    words = shlex.split(row["command"].format(**known))
    if words[0] == "fastkd":
        return [sys.executable, "-m", "fastkd", *words[1:]]
    return [sys.executable, *words[1:]] if words[0] == "python" else words


def resumed(command: list[str], run_dir: Path | None) -> list[str]:
    """The command that goes on with an unfinished fastkd run: `--resume` from its last
    checkpoint; a folder left before its first checkpoint (refused, or killed early) is removed."""
    if run_dir is None or not run_dir.exists() or command[1:3] != ["-m", "fastkd"]:
        return command
    if (run_dir / "last.pt").is_file():
        return [*command, "--resume"]
    shutil.rmtree(run_dir)
    return command


def run(folder: Path, *, data: Path, out: Path, only: list[str], seeds: list[int] | None,
        variables: dict[str, str] | None = None) -> None:
    spec, results = load(folder)
    unknown = sorted(set(only) - {row["name"] for row in spec["rows"] if "command" in row})
    if unknown:
        raise SystemExit(f"--only: no such row with a command: {', '.join(unknown)}")
    done = {(r["row"], r["seed"]) for r in results}
    (out / "logs").mkdir(parents=True, exist_ok=True)
    for seed in seeds if seeds is not None else spec["seeds"]:
        for row in spec["rows"]:
            if "command" not in row or (only and row["name"] not in only) or (row.get("once") and
                                                                            seed != spec["seeds"][0]):
                continue
            if (row["name"], seed) in done:
                continue
            command = command_of(row, seed, data, out, **(variables or {}))
            run_dir = out / "runs" / row["run"].format(seed=seed) if row.get("run") else None
            wall: float | None = None
            if run_dir is not None and (run_dir / "summary.json").is_file():
                print(f"[experiment] {row['name']} seed {seed}: {run_dir} finished before, recorded", flush=True)
            else:
                command = resumed(command, run_dir)
                log = out / "logs" / f"{row['name']}-s{seed}.log"
                print(f"[experiment] {row['name']} seed {seed}: {shlex.join(command)}", flush=True)
                started = time.perf_counter()
                with log.open("a") as f:
                    f.write(f"$ {shlex.join(command)}\n")
                    f.flush()
                    code = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
                wall = round(time.perf_counter() - started, 2)
                if code != 0:
                    raise SystemExit(f"[experiment] {row['name']} seed {seed} failed (exit {code}): see {log}")
            record: dict[str, Any] = {"row": row["name"], "seed": seed, "command_seconds": wall,
                                      "git": git_revision(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            if run_dir is not None:
                summary = json.loads((run_dir / "summary.json").read_text())
                record.update({key: summary.get(key) for key in RESULT_KEYS})
                record["device"] = summary.get("device")
            with (folder / "results.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
            write_table(folder)


def mean_sd(values: list[float], digits: int = 2) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def pooled_sd(groups: list[list[float]]) -> float | None:
    """The seed noise of a recipe group: the standard deviation pooled over its rows (each row's
    runs about its own mean)."""
    pieces = [(len(v) - 1, statistics.variance(v)) for v in groups if len(v) > 1]
    freedom = sum(n for n, _ in pieces)
    return math.sqrt(sum(n * var for n, var in pieces) / freedom) if freedom else None


def figures(spec: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Each row's runs, by seed: a row with `runs_of` reads another row's runs, its `metric` as
    the row's best val top-1."""
    by_row: dict[str, list[dict[str, Any]]] = {}
    for record in results:
        by_row.setdefault(record["row"], []).append(record)
    out = {}
    for row in spec["rows"]:
        records = sorted(by_row.get(row.get("runs_of", row["name"]), []), key=lambda r: r["seed"])
        metric = row.get("metric")
        out[row["name"]] = [{**r, "best_val_top1": r.get(metric)} for r in records] if metric else records
    return out


def wall_of(record: dict[str, Any]) -> float | None:
    """The command's wall seconds; a record imported from before this script has its run's own."""
    found = record.get("command_seconds")
    return found if found is not None else record.get("wall_seconds")


def top1(records: list[dict[str, Any]]) -> list[float]:
    return [r["best_val_top1"] for r in records if r.get("best_val_top1") is not None]


def difference(a: list[dict[str, Any]], b: list[dict[str, Any]], paired: bool) -> tuple[float, float] | None:
    """a - b in best val top-1, with two standard errors: Welch's, or of the per-seed differences."""
    if paired:
        seeds = sorted({r["seed"] for r in a} & {r["seed"] for r in b})
        x = {r["seed"]: r["best_val_top1"] for r in a}
        y = {r["seed"]: r["best_val_top1"] for r in b}
        diffs = [x[s] - y[s] for s in seeds if x.get(s) is not None and y.get(s) is not None]
        if len(diffs) < 2:
            return None
        return statistics.mean(diffs), 2 * statistics.stdev(diffs) / math.sqrt(len(diffs))
    x, y = top1(a), top1(b)
    if len(x) < 2 or len(y) < 2:
        return None
    return (statistics.mean(x) - statistics.mean(y),
            2 * math.sqrt(statistics.variance(x) / len(x) + statistics.variance(y) / len(y)))


def render(folder: Path) -> str:
    spec, results = load(folder)
    runs = figures(spec, results)
    lines = [f"# {spec['title']}", "", f"**Question.** {spec['question']}", "",
             f"**Recipe.** {spec['recipe']}", "", f"**Machine.** {spec['machine']}", "",
             "**Commands** (`python benchmarks/experiment.py run` runs them; `{seed}` for each of "
             f"seeds {', '.join(map(str, spec['seeds']))}):", ""]
    lines += [f"- `{row['name']}`: `{row['command']}`" for row in spec["rows"] if "command" in row]
    commits = sorted({r["git"] for r in results if r.get("git")})
    lines += ["", f"Commits the runs were made at: {', '.join(commits) or 'none yet'}. Rendered from results.jsonl by "
              "`python benchmarks/experiment.py render` (never edited by hand).", ""]
    columns = spec.get("columns", [])
    head = ["run", *columns, "group", "best val top-1 (mean ± sd)", "per seed", "train-val gap", "train images/s",
            "wall s per run", "seeds"]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in spec["rows"]:
        records = runs[row["name"]]
        gaps = [r["train_val_gap"] for r in records if r.get("train_val_gap") is not None] if row.get("gap", True) else []
        wall = [w for w in map(wall_of, records) if w is not None]
        speed = [r["images_per_sec"] for r in records if r.get("images_per_sec")]
        extra = "".join(f"{row.get(column, '')} | " for column in columns)
        lines.append(f"| {row.get('label', row['name'])} | {extra}{row.get('group', '')} | {mean_sd(top1(records))} | "
                     f"{' / '.join(f'{v:.2f}' for v in top1(records))} | {mean_sd(gaps)} | {mean_sd(speed, 0)} | "
                     f"{mean_sd(wall, 0)} | {', '.join(str(r['seed']) for r in records)} |")
    notes = []
    for a, b, what, *paired in spec.get("compare", []):
        found = difference(runs[a], runs[b], bool(paired and paired[0]))
        if found is not None:
            gain, error = found
            verdict = "beyond seed noise" if abs(gain) > error else "within seed noise"
            notes.append(f"- {what}: {gain:+.2f} points, two standard errors {error:.2f}: {verdict}")
    noise = spec["noise"] if "noise" in spec else sorted({row["group"] for row in spec["rows"] if row.get("group")})
    pooled_rows = [top1(runs[row["name"]]) for row in spec["rows"] if row.get("group") in noise]
    sd = pooled_sd(pooled_rows)
    if sd is not None and noise:
        n = min(len(v) for v in pooled_rows if len(v) > 1)
        notes.append(f"- Seed noise: pooled standard deviation {sd:.2f} points over "
                     f"{sum(len(v) > 1 for v in pooled_rows)} rows (groups {', '.join(noise)}); with {n} seeds a "
                     f"difference of two rows' means is resolved beyond two standard errors from "
                     f"{2 * sd * math.sqrt(2 / n):.2f} points.")
    sums: dict[str, float] = {}
    for wall in spec.get("walls", []):
        total = sum(wall_of(r) or 0.0 for row in spec["rows"]
                    if row.get("group") in wall["groups"] and "runs_of" not in row for r in runs[row["name"]])
        sums[wall["what"]] = total
        ratio = f" ({total / sums[wall['ratio_to']]:.2f} of {wall['ratio_to']})" if sums.get(wall.get("ratio_to")) else ""
        notes.append(f"- Wall time, {wall['what']} (groups {', '.join(wall['groups'])}): {total / 60:.1f} min{ratio}.")
    if notes:
        lines += ["", *notes]
    if spec.get("notes"):
        lines += ["", spec["notes"].strip()]
    return "\n".join(lines) + "\n"


def write_table(folder: Path) -> str:
    text = render(folder)
    (folder / "table.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    go = commands.add_parser("run")
    go.add_argument("folder", type=Path)
    go.add_argument("--data", type=Path, required=True, help="the dataset folder ({data} in the commands)")
    go.add_argument("--out", type=Path, required=True, help="runs, caches and logs ({out} in the commands)")
    go.add_argument("--only", nargs="*", default=[], help="these rows only")
    go.add_argument("--seeds", type=int, nargs="*", help="these seeds only (default: the experiment's)")
    go.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                    help="a value for {NAME} in the commands (e.g. original=PATH)")
    show = commands.add_parser("render")
    show.add_argument("folder", type=Path)
    args = parser.parse_args()
    if args.command == "run":
        variables = dict(item.split("=", 1) for item in args.var)
        run(args.folder, data=args.data.resolve(), out=args.out.resolve(), only=args.only, seeds=args.seeds,
            variables=variables)
    else:
        print(write_table(args.folder), end="")


if __name__ == "__main__":
    main()
