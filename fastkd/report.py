"""`fastkd report`: one table of runs and plots (accuracy against speed, training curves)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from fastkd.errors import FastkdError


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


def write_report(run_dirs: Sequence[Path], out: Path) -> Path:
    """`report.md` with the runs table, plus `<stem>-speed.png` and `<stem>-curves.png` beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [load_run(d) for d in run_dirs]
    out.parent.mkdir(parents=True, exist_ok=True)
    speed_png, curves_png = out.with_name(f"{out.stem}-speed.png"), out.with_name(f"{out.stem}-curves.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        s = run["summary"]
        ax.scatter(s["images_per_sec"], s["best_val_top1"])
        ax.annotate(run["dir"].name, (s["images_per_sec"], s["best_val_top1"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("training images/second")
    ax.set_ylabel("best val top-1 (%)")
    ax.set_title("accuracy against speed")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(speed_png, dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        epochs = [r["epoch"] for r in run["records"]]
        line, = axes[0].plot(epochs, [r["val_top1"] for r in run["records"]], label=f"{run['dir'].name} val")
        axes[0].plot(epochs, [r["train_top1"] for r in run["records"]], linestyle="--", color=line.get_color(),
                     label=f"{run['dir'].name} train")
        axes[1].plot(epochs, [r["val_loss"] for r in run["records"]], color=line.get_color(), label=run["dir"].name)
    axes[0].set(xlabel="epoch", ylabel="top-1 (%)", title="top-1 (train: running, dashed)")
    axes[1].set(xlabel="epoch", ylabel="val loss", title="validation loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(curves_png, dpi=120)
    plt.close(fig)

    out.write_text(f"{runs_table(runs)}\n\n![accuracy against speed]({speed_png.name})\n\n"
                   f"![training curves]({curves_png.name})\n")
    return out
