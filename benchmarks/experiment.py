"""Experiments kept as data: a folder under benchmarks/results/ holds `experiment.yaml` (the
question, the machine, its rows), `results.jsonl` (one line per run: row, seed, what its run
reported, its wall time, the commit) and `table.md`, rendered from the two, never edited by hand.

    python benchmarks/experiment.py run    FOLDER --data DATA --out OUT [--only ROW ...] [--seeds 0 1 2]
    python benchmarks/experiment.py render FOLDER

A row of `experiment.yaml`:

    - name: kd-live            # how comparisons and results name it
      label: x0.5 distilled, live teacher
      group: student           # recipe group: seed noise is pooled over a group's rows
      command: fastkd distill --config configs/cifar10/kd.yaml run.name=kd-s{seed} ...
      run: kd-s{seed}          # the run folder under {out}/runs whose summary.json holds the result
                               # (none: the command is timed only, e.g. recording a teacher cache)
      once: true               # runs once (seed 0 only), e.g. a teacher all seeds share

`{seed}`, `{data}` and `{out}` in a command are filled in; `fastkd` is `python -m fastkd` of this
checkout. `compare: [[a, b, "what it asks"], ...]` lists the differences the table states, each
with two standard errors of the difference and whether it is beyond seed noise. Runs are resumable:
a row and seed already in results.jsonl is not run again.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULT_KEYS = ("best_val_top1", "final_val_top1", "train_val_gap", "images_per_sec", "train_seconds", "wall_seconds")


def load(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    spec = yaml.safe_load((folder / "experiment.yaml").read_text())
    path = folder / "results.jsonl"
    results = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return spec, results


def git_revision() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    return done.stdout.strip() + ("-dirty" if dirty else "")


def command_of(row: dict[str, Any], seed: int, data: Path, out: Path) -> list[str]:
    words = shlex.split(row["command"].format(seed=seed, data=data, out=out))
    return [sys.executable, "-m", "fastkd", *words[1:]] if words[0] == "fastkd" else words


def run(folder: Path, *, data: Path, out: Path, only: list[str], seeds: list[int] | None) -> None:
    spec, results = load(folder)
    done = {(r["row"], r["seed"]) for r in results}
    (out / "logs").mkdir(parents=True, exist_ok=True)
    for seed in seeds if seeds is not None else spec["seeds"]:
        for row in spec["rows"]:
            if (only and row["name"] not in only) or (row.get("once") and seed != spec["seeds"][0]):
                continue
            if (row["name"], seed) in done:
                continue
            command = command_of(row, seed, data, out)
            log = out / "logs" / f"{row['name']}-s{seed}.log"
            print(f"[experiment] {row['name']} seed {seed}: {shlex.join(command)}", flush=True)
            started = time.perf_counter()
            with log.open("a") as f:
                code = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
            wall = round(time.perf_counter() - started, 1)
            if code != 0:
                raise SystemExit(f"[experiment] {row['name']} seed {seed} failed (exit {code}): see {log}")
            record: dict[str, Any] = {"row": row["name"], "seed": seed, "command_seconds": wall,
                                      "git": git_revision(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            if row.get("run"):
                summary = json.loads((out / "runs" / row["run"].format(seed=seed) / "summary.json").read_text())
                record.update({key: summary.get(key) for key in RESULT_KEYS})
                record["device"] = summary.get("device")
            with (folder / "results.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
            render(folder)


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


def render(folder: Path) -> str:
    spec, results = load(folder)
    by_row: dict[str, list[dict[str, Any]]] = {}
    for record in results:
        by_row.setdefault(record["row"], []).append(record)
    lines = [f"# {spec['title']}", "", f"**Question.** {spec['question']}", "",
             f"**Recipe.** {spec['recipe']}", "", f"**Machine.** {spec['machine']}", "",
             "**Commands** (`python benchmarks/experiment.py run` runs them; `{seed}` for each of "
             f"seeds {', '.join(map(str, spec['seeds']))}):", ""]
    lines += [f"- `{row['name']}`: `{row['command']}`" for row in spec["rows"]]
    commits = sorted({r["git"] for r in results})
    lines += ["", f"Commits the runs were made at: {', '.join(commits) or 'none yet'}. Rendered from results.jsonl by "
              "`python benchmarks/experiment.py render` (never edited by hand).", ""]
    header = "| run | group | best val top-1 (mean ± sd) | per seed | train images/s | wall s per run | seeds |"
    lines += [header, "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in spec["rows"]:
        records = sorted(by_row.get(row["name"], []), key=lambda r: r["seed"])
        top1 = [r["best_val_top1"] for r in records if r.get("best_val_top1") is not None]
        wall = [r.get("wall_seconds") or r["command_seconds"] for r in records]
        speed = [r["images_per_sec"] for r in records if r.get("images_per_sec")]
        lines.append(f"| {row.get('label', row['name'])} | {row.get('group', '')} | {mean_sd(top1)} | "
                     f"{' / '.join(f'{v:.2f}' for v in top1)} | {mean_sd(speed, 0)} | {mean_sd(wall, 0)} | "
                     f"{', '.join(str(r['seed']) for r in records)} |")
    groups: dict[str, list[list[float]]] = {}
    for row in spec["rows"]:
        top1 = [r["best_val_top1"] for r in by_row.get(row["name"], []) if r.get("best_val_top1") is not None]
        if row.get("group") and top1:
            groups.setdefault(row["group"], []).append(top1)
    notes = []
    for group, values in groups.items():
        sd = pooled_sd(values)
        if sd is not None:
            notes.append(f"- seed noise of the {group} rows: pooled sd {sd:.2f} over {sum(map(len, values))} runs")
    for a, b, what in spec.get("compare", []):
        x = [r["best_val_top1"] for r in by_row.get(a, [])]
        y = [r["best_val_top1"] for r in by_row.get(b, [])]
        if len(x) > 1 and len(y) > 1:
            gain = statistics.mean(x) - statistics.mean(y)
            error = 2 * math.sqrt(statistics.variance(x) / len(x) + statistics.variance(y) / len(y))
            verdict = "beyond seed noise" if abs(gain) > error else "within seed noise"
            notes.append(f"- {what} ({a} - {b}): {gain:+.2f} points, two standard errors {error:.2f}: {verdict}")
    if notes:
        lines += ["", *notes]
    if spec.get("notes"):
        lines += ["", spec["notes"].strip()]
    text = "\n".join(lines) + "\n"
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
    show = commands.add_parser("render")
    show.add_argument("folder", type=Path)
    args = parser.parse_args()
    if args.command == "run":
        run(args.folder, data=args.data.resolve(), out=args.out.resolve(), only=args.only, seeds=args.seeds)
    else:
        print(render(args.folder), end="")


if __name__ == "__main__":
    main()
