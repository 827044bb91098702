"""`fastkd report`: one table of runs and plots (accuracy against speed, training curves)."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path
from typing import Any, Sequence

from fastkd.errors import FastkdError
from fastkd.log import log


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def load_run(run_dir: Path) -> dict[str, Any]:
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise FastkdError(f"not a finished fastkd run (no summary.json): {run_dir}")
    metrics_path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()] \
        if metrics_path.is_file() else []
    return {"dir": run_dir, "summary": json.loads(summary_path.read_text()), "records": records}


def find_runs(paths: Sequence[Path]) -> tuple[list[Path], list[str]]:
    """Finished run folders among `paths` (each a run folder or a folder holding runs), in order,
    and one note per path left out (a file, an unfinished run, a folder without runs)."""
    runs: list[Path] = []
    skipped: list[str] = []
    for path in paths:
        if (path / "summary.json").is_file():
            runs.append(path)
        elif not path.exists():
            skipped.append(f"{path}: not found")
        elif not path.is_dir():
            skipped.append(f"{path}: a file, not a run folder")
        else:
            inside = sorted(p for p in path.iterdir() if p.is_dir() and (p / "summary.json").is_file())
            if inside:
                runs += inside
                skipped += [f"{p}: no summary.json (not a finished run)" for p in sorted(path.iterdir())
                            if p.is_dir() and p not in inside]
            else:
                skipped.append(f"{path}: no summary.json (not a finished run) and no finished runs inside")
    unique = list(dict.fromkeys(runs))
    return unique, skipped


_SEED_SUFFIX = re.compile(r"[-_](s|seed)\d+$")


def group_name(run_dir: Path) -> str:
    """Runs named alike but for a trailing seed (`student-s0`, `student-s1`) form one group."""
    return _SEED_SUFFIX.sub("", run_dir.name)


def group_runs(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Runs of one folder named alike but for a seed suffix, in a group each; runs of other
    folders with the same names stay apart (named with their folder then)."""
    keyed: dict[tuple[Path, str], list[dict[str, Any]]] = {}
    for run in runs:
        keyed.setdefault((run["dir"].parent, group_name(run["dir"])), []).append(run)
    names = [name for _, name in keyed]
    return {(name if names.count(name) == 1 else f"{parent.name}/{name}"): members
            for (parent, name), members in keyed.items()}


_GROUP_SAME = ("model", "backend")
"""Summary fields every run of a group must share for their mean to mean something."""


def _fmt(value: Any, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def runs_table(runs: list[dict[str, Any]]) -> str:
    rows = []
    for run in runs:
        s = run["summary"]
        teacher = s.get("teacher") or {}
        rows.append([run["dir"].name, s["model"], teacher.get("arch", ""), s.get("loss", "ce"), s["backend"],
                     _fmt(s["best_val_top1"]), _fmt(s["best_val_top5"]), _fmt(s["final_val_top1"]),
                     _fmt(s["final_val_top5"]), _fmt(s["train_val_gap"]), _fmt(s["images_per_sec"], 0),
                     _fmt(s["wall_seconds"], 0), s["device"]])
    return markdown_table(["run", "model", "teacher", "loss", "backend", "best top-1", "best top-5", "final top-1",
                           "final top-5", "train-val gap", "images/s", "wall s", "device"], rows)


def mean_sd_text(values: Sequence[float | None], digits: int = 2) -> str:
    """`mean ± sample sd` of the values given (None left out); one value as it is."""
    given = [v for v in values if v is not None]
    if not given:
        return ""
    if len(given) == 1:
        return f"{given[0]:.{digits}f}"
    return f"{statistics.mean(given):.{digits}f} ± {statistics.stdev(given):.{digits}f}"


def groups_table(groups: dict[str, list[dict[str, Any]]]) -> str:
    rows = []
    for name, runs in groups.items():
        s = runs[0]["summary"]
        teacher = s.get("teacher") or {}
        differing = [key for key in _GROUP_SAME if len({r["summary"].get(key) for r in runs}) > 1]
        if differing:
            raise FastkdError(f"runs {', '.join(r['dir'].name for r in runs)} differ only by a seed suffix but have "
                              f"different {' and '.join(differing)}: rename them to report them apart")
        column = lambda key: [r["summary"].get(key) for r in runs]  # noqa: E731
        rows.append([name, len(runs), s["model"], teacher.get("arch", ""), s["backend"], mean_sd_text(column("best_val_top1")),
                     mean_sd_text(column("final_val_top1")), mean_sd_text(column("train_val_gap")),
                     mean_sd_text(column("images_per_sec"), 0), mean_sd_text(column("wall_seconds"), 0)])
    return markdown_table(["runs", "n", "model", "teacher", "backend", "best top-1", "final top-1", "train-val gap",
                           "images/s", "wall s"], rows)


def _curve(runs: list[dict[str, Any]], key: str) -> tuple[list[int], list[float], list[float]]:
    """Epochs that every run of a group reached with a finite `key`, with its mean and standard
    deviation (a diverged epoch's inf or NaN loss is left out: no axis can show it)."""
    by_epoch = [{r["epoch"]: r[key] for r in run["records"]
                 if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])} for run in runs]
    epochs = sorted(set.intersection(*[set(b) for b in by_epoch]))
    means = [statistics.mean(b[e] for b in by_epoch) for e in epochs]
    sds = [statistics.stdev([b[e] for b in by_epoch]) if len(runs) > 1 else 0.0 for e in epochs]
    return epochs, means, sds


def write_report(paths: Sequence[Path], out: Path) -> Path:
    """`report.md` with the runs table (and, for runs that differ only by a seed suffix, their mean
    and standard deviation), plus `<stem>-speed.png` and `<stem>-curves.png` beside it. Each path
    is a run folder or a folder holding runs; what is not a finished run is left out with a note."""

    run_dirs, skipped = find_runs(paths)
    for note in skipped:
        log.warning(f"fastkd report: skipping {note}")
    if not run_dirs:
        raise FastkdError("no finished fastkd run (a folder with summary.json) among: "
                          + ", ".join(map(str, paths)))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = [load_run(d) for d in run_dirs]
    groups = group_runs(runs)
    grouped_table = groups_table(groups)  # refuses groups that mix models or backends, before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    speed_png, curves_png = out.with_name(f"{out.stem}-speed.png"), out.with_name(f"{out.stem}-curves.png")
    seeded = any(len(g) > 1 for g in groups.values())

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, members in groups.items():
        timed = [r for r in members if r["summary"].get("images_per_sec") is not None]
        if not timed:
            continue  # no speed to place it at (a run that trained no step)
        speeds = [r["summary"]["images_per_sec"] for r in timed]
        top1 = [r["summary"]["best_val_top1"] for r in timed]
        x, y = statistics.mean(speeds), statistics.mean(top1)
        spread = len(timed) > 1
        ax.errorbar(x, y, xerr=statistics.stdev(speeds) if spread else None,
                    yerr=statistics.stdev(top1) if spread else None, fmt="o", capsize=3)
        ax.annotate(f"{name} (n={len(timed)})" if spread else name, (x, y), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xlabel("training images/second")
    ax.set_ylabel("best val top-1 (%)")
    ax.set_title("accuracy against speed" + (" (mean ± sd over seeds)" if seeded else ""))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(speed_png, dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
    for name, members in groups.items():
        label = f"{name} (n={len(members)})" if len(members) > 1 else name
        epochs, val, val_sd = _curve(members, "val_top1")
        line, = axes[0].plot(epochs, val, marker=".", label=label)
        if len(members) > 1:
            axes[0].fill_between(epochs, [m - s for m, s in zip(val, val_sd)], [m + s for m, s in zip(val, val_sd)],
                                 color=line.get_color(), alpha=0.15, linewidth=0)
        epochs_train, train, _ = _curve(members, "train_top1")
        axes[0].plot(epochs_train, train, linestyle="--", color=line.get_color())
        epochs_loss, loss, _ = _curve(members, "val_loss")
        axes[1].plot(epochs_loss, loss, marker=".", color=line.get_color())
    axes[0].set(xlabel="epoch", ylabel="top-1 (%)", title="top-1 (val solid" + (", ± sd shaded" if seeded else "")
                + "; train: running, dashed)")
    # A diverging early epoch (val loss in the hundreds) would flatten every other point on a linear axis.
    axes[1].set_yscale("log")
    axes[1].set(xlabel="epoch", ylabel="val loss (log scale)", title="validation loss" + (" (mean)" if seeded else ""))
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3, which="both")
    fig.legend(loc="outside right center", fontsize=7)
    fig.savefig(curves_png, dpi=120)
    plt.close(fig)

    grouped = f"Mean ± standard deviation over the runs that differ only by a seed suffix:\n\n{grouped_table}\n\n" \
        if seeded else ""
    out.write_text(f"{runs_table(runs)}\n\n{grouped}![accuracy against speed]({speed_png.name})\n\n"
                   f"![training curves]({curves_png.name})\n")
    return out
