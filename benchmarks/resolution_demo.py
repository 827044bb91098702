"""Time to accuracy on the demo data: the distilled demo student (a) at its fixed 64 px, (b)
ramped from 32 px and tested at 80 px, (c) trained at 48 px against the teacher's 64 px view of
the same crops (tested at 64 px). Every variant replays a teacher cache (recorded once per
teacher view: (a) and (c) share one, since the teacher sees 64 px crops in both).

    python benchmarks/resolution_demo.py --out runs/resolution-demo --seeds 0 1 2

Trains the demo teacher first unless `OUT/teacher` has finished; prints and writes
`OUT/resolution.md`: mean and standard deviation over the seeds of the best val top-1 and of the
training wall time, then each variant's last checkpoint tested at every size of `TEST_SIZES`
(which tells the schedule's effect from the test size's). Finished runs are reused.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from fastkd import commands
from fastkd.config import load_config
from fastkd.demo import _run_or_reuse, find_demo_configs
from fastkd.env import collect_env
from fastkd.report import markdown_table

VARIANTS = {
    "(a) fixed 64 px, tested at 64 px": ("cache-64", []),
    "(b) ramped 32 -> 64 px over epochs 2-16, tested at 80 px": ("cache-ramp", [
        "data.size_schedule={start_image_size: 32, ramp_epochs: [2, 16], image_size_step: 16}",
        "data.val_image_size=80", "data.val_resize=null"]),
    "(c) 48 px student, 64 px teacher view, tested at 64 px": ("cache-64", [
        "data.image_size=48", "distill.teacher.image_size=64", "data.val_image_size=64", "data.val_resize=null"]),
}
TEST_SIZES = (48, 64, 80)
"""Validation crop sides every variant's last checkpoint is tested at (resize: 8/7 of the crop)."""


def mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/resolution-demo"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    folder = find_demo_configs()
    base = [f"run.out_dir={args.out}"]
    teacher_cfg = load_config(folder / "teacher.yaml", base)
    teacher = _run_or_reuse(teacher_cfg, progress=False)
    rows, test_rows, cache_seconds = [], [], {}
    for name, (cache, overrides) in VARIANTS.items():
        results, configs = [], []
        for seed in args.seeds:
            slug = name.split(")")[0].strip("(")
            cfg = load_config(folder / "distill.yaml", [
                *base, f"run.seed={seed}", f"run.name=distill-{slug}-s{seed}",
                f"distill.teacher.checkpoint={teacher_cfg.run_dir / 'best.pt'}",
                f"distill.teacher_cache={args.out / cache}", *overrides])
            if cache not in cache_seconds:
                started = time.perf_counter()
                recorded = commands.record_teacher_cache(cfg, progress=False)["recorded_now"]
                cache_seconds[cache] = time.perf_counter() - started if recorded else None  # None: reused
            results.append(_run_or_reuse(cfg, progress=False))
            configs.append(cfg)
        top1 = [r["best_val_top1"] for r in results]
        wall = [r["wall_seconds"] for r in results]
        rows.append([name, mean_sd(top1), mean_sd(wall), ", ".join(f"{t:.2f}" for t in top1), cache])
        test_rows.append([name, *(mean_sd([commands.evaluate_checkpoint(
            load_config(cfg.run_dir / "config.yaml", [f"data.val_image_size={size}", "data.val_resize=null"]),
            cfg.run_dir / "last.pt")["top1"] for cfg in configs]) for size in TEST_SIZES)])
    env = collect_env(None)
    table = markdown_table(["student (ShuffleNet-v2 x0.5, 20 epochs, from the teacher cache)",
                            "best val top-1 (mean ± sd)", "training wall s (mean ± sd)", "per seed", "cache"], rows)
    tested = markdown_table(["last checkpoint, val top-1 (mean ± sd) when tested at",
                             *(f"{size} px" for size in TEST_SIZES)], test_rows)
    text = (f"Seeds {args.seeds}; teacher ResNet-18 {teacher['best_val_top1']:.2f}% val top-1; "
            f"{env.get('device')}, torch {env.get('torch')}. Cache recording: "
            + ", ".join(f"{k} {v:.0f} s" if v is not None else f"{k} reused" for k, v in cache_seconds.items()) + ".\n\n" + table + "\n\n" + tested + "\n")
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "resolution.md").write_text(text)
    (args.out / "resolution.json").write_text(json.dumps({"rows": rows, "tested_at": test_rows, "cache_seconds": cache_seconds}, indent=2))


if __name__ == "__main__":
    main()
