"""`fastkd demo`: teacher, student alone, student distilled, on the built-in demo data.

Runs `configs/demo/{teacher,student,distill}.yaml` (the teacher once, the two student runs
once per seed) and prints one table. The seeds vary the students' initialization; every run
sees the same training stream (`data.seed`), so the teacher's logits are recorded once into a
teacher cache and every distilled student replays them at student-only cost
(`--no-teacher-cache`: the teacher runs live in every distillation instead). Re-running
continues: finished runs are reused, interrupted ones resumed, the cache extended.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import fastkd
from fastkd import commands
from fastkd.config import Config, load_config
from fastkd.errors import FastkdError
from fastkd.log import log
from fastkd.loop import Interrupted, StopFlag, stop_on_signals
from fastkd.report import markdown_table


def find_demo_configs(explicit: Path | None = None) -> Path:
    candidates = [explicit] if explicit else [Path(fastkd.__file__).resolve().parents[1] / "configs" / "demo",
                                              Path.cwd() / "configs" / "demo"]
    for folder in candidates:
        if folder is not None and all((folder / f"{n}.yaml").is_file() for n in ("teacher", "student", "distill")):
            return folder
    raise FastkdError("demo configs not found (configs/demo/teacher.yaml, student.yaml, distill.yaml): run "
                      "`fastkd demo` from a checkout of fastkd, or pass --configs DIR")


def _stop_if_asked(stop: StopFlag, out_dir: Path) -> None:
    """Between runs: a stop requested while no run was training ends the demo here."""
    if stop.requested:
        raise Interrupted(0, stop.signum, kept=f"the finished runs in {out_dir}")


def _run_or_reuse(cfg: Config, *, progress: bool, stop: StopFlag) -> dict[str, Any]:
    run_dir = cfg.run_dir
    if (run_dir / "summary.json").is_file():
        log.info(f"[demo] reusing finished run {run_dir}")
        return json.loads((run_dir / "summary.json").read_text())
    _stop_if_asked(stop, run_dir.parent)
    resume = (run_dir / "last.pt").is_file()
    log.info(f"[demo] {'resuming' if resume else 'starting'} {run_dir}")
    run = commands.distill if cfg.distill is not None else commands.train
    return run(cfg, resume=resume, progress=progress).summary


def run_demo(out_dir: Path, *, seeds: Sequence[int] = (0,), overrides: Sequence[str] = (),
             configs: Path | None = None, progress: bool = True, teacher_cache: bool = True) -> dict[str, Any]:
    """The demo's runs, then its table. SIGTERM/SIGINT stop it cleanly (`Interrupted`): the run
    in progress saves a checkpoint, a recording keeps its finished epochs, and the same call
    goes on from there."""
    stop = StopFlag()
    with stop_on_signals(stop):
        return _run_demo(out_dir, seeds=seeds, overrides=overrides, configs=configs, progress=progress,
                         teacher_cache=teacher_cache, stop=stop)


def _run_demo(out_dir: Path, *, seeds: Sequence[int], overrides: Sequence[str], configs: Path | None,
              progress: bool, teacher_cache: bool, stop: StopFlag) -> dict[str, Any]:
    folder = find_demo_configs(configs)
    common = [o for o in overrides if not o.startswith("distill.")]
    distill_only = [o for o in overrides if o.startswith("distill.")]
    base = [f"run.out_dir={out_dir}", *common]
    teacher_cfg = load_config(folder / "teacher.yaml", base)
    student_arch = load_config(folder / "student.yaml", base).model.arch
    distilled_how = "its recorded logits (a teacher cache, recorded once)" if teacher_cache else "the live teacher"
    log.info(f"[demo] {1 + 2 * len(seeds)} runs into {out_dir}: a {teacher_cfg.model.arch} teacher, then for each seed "
             f"({', '.join(map(str, seeds))}) a {student_arch} student alone and one distilled from {distilled_how}; "
             f"{teacher_cfg.optim.epochs} epochs each at {teacher_cfg.data.image_size} px on {teacher_cfg.data.root_path}"
             f"{' (generated first if missing)' if teacher_cfg.data.generate_demo else ''}. Each run prints a line per "
             "epoch; the table comes at the end.")
    teacher = _run_or_reuse(teacher_cfg, progress=progress, stop=stop)
    rows = [("teacher", teacher_cfg, teacher, 0)]
    cache_dir = out_dir / "teacher-cache"
    distilled_name = "distill" if teacher_cache else "distill-live"
    teacher_settings = [f"distill.teacher.checkpoint={teacher_cfg.run_dir / 'best.pt'}",
                        f"distill.teacher_cache={cache_dir if teacher_cache else ''}"]
    cache_seconds = None
    for seed in seeds:
        per_seed = [f"run.seed={seed}"]
        student_cfg = load_config(folder / "student.yaml", [*base, *per_seed, f"run.name=student-s{seed}"])
        rows.append(("student alone", student_cfg, _run_or_reuse(student_cfg, progress=progress, stop=stop), seed))
        distill_cfg = load_config(folder / "distill.yaml", [
            *base, *per_seed, f"run.name={distilled_name}-s{seed}", *teacher_settings, *distill_only])
        if teacher_cache and cache_seconds is None:
            _stop_if_asked(stop, out_dir)
            started = time.perf_counter()
            done = commands.record_teacher_cache(distill_cfg, progress=progress)  # once: every seed replays it
            cache_seconds = time.perf_counter() - started
            log.info(f"[demo] teacher cache {cache_dir}: {len(done['recorded_now'])} epoch(s) recorded in "
                     f"{cache_seconds:.0f} s")
        rows.append(("student distilled", distill_cfg, _run_or_reuse(distill_cfg, progress=progress, stop=stop), seed))

    table = markdown_table(
        ["run", "model", "seed", "best val top-1", "final val top-1", "images/s", "wall s"],
        [[role, cfg.model.arch, seed, f"{s['best_val_top1']:.2f}", f"{s['final_val_top1']:.2f}",
          f"{s['images_per_sec']:.0f}", f"{s['wall_seconds']:.0f}"] for role, cfg, s, seed in rows])
    alone = [s["best_val_top1"] for role, _, s, _ in rows if role == "student alone"]
    distilled = [s["best_val_top1"] for role, _, s, _ in rows if role == "student distilled"]
    verdict = _verdict(alone, distilled)
    distilled_seconds = sum(s["wall_seconds"] for role, _, s, _ in rows if role == "student distilled")
    if teacher_cache:
        verdict += (f"\nDistilled students: {distilled_seconds:.0f} s of training from the teacher cache, which took "
                    f"{cache_seconds:.0f} s to record (once for all seeds).")
    result = {"table": table, "verdict": verdict, "teacher_top1": teacher["best_val_top1"],
              "student_alone_top1": alone, "student_distilled_top1": distilled, "seeds": list(seeds),
              "device": teacher.get("device"), "teacher_cache": str(cache_dir) if teacher_cache else None,
              "teacher_cache_seconds": cache_seconds, "distilled_wall_seconds": distilled_seconds}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "demo.md").write_text(table + "\n\n" + verdict + "\n")
    return result


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (n={len(values)})"


def _verdict(alone: list[float], distilled: list[float]) -> str:
    gain = statistics.mean(distilled) - statistics.mean(alone)
    if len(alone) < 2 or len(distilled) < 2:
        judgement = "one seed only: run with --seeds 0 1 2 to see whether the difference exceeds seed noise"
    else:
        # Two standard errors of the difference of the means (roughly a 95% interval).
        error = math.sqrt(statistics.variance(alone) / len(alone) + statistics.variance(distilled) / len(distilled))
        if abs(gain) <= 2 * error:
            judgement = f"within two standard errors ({2 * error:.2f}): no clear effect at this number of seeds"
        else:
            judgement = f"{'helped' if gain > 0 else 'hurt'}: more than two standard errors ({2 * error:.2f})"
            judgement = "distillation " + judgement
    return (f"Best val top-1, student alone {_spread(alone)} vs distilled {_spread(distilled)}: "
            f"{gain:+.2f} points; {judgement}.")
