"""What each command does with its run (`fastkd.engine.build_run`): `fastkd train` and `distill`
fit it, `teacher-cache` records its teacher's logits, `eval` evaluates a checkpoint's weights.

Everything that can fail on user input (config, model name, data, teacher, run directory) is
checked before the run directory is created, so a refused run writes nothing.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastkd import teacher_cache_recorder
from fastkd.checkpoint import is_fastkd_checkpoint, load_checkpoint
from fastkd.config import Config, config_to_dict
from fastkd.data import size_schedule
from fastkd.distributed import barrier, started
from fastkd.engine import Weights, build_run
from fastkd.errors import CheckpointError, ConfigError
from fastkd.log import log
from fastkd.loop import Training, TrainState, evaluate, fit, restore_training, stop_on_signals
from fastkd.metrics import RunLogger
from fastkd.models import resolve_normalization
from fastkd.optim import lr_at
from fastkd.run_dir import create_run_dir, open_run_dir, print_epoch, run_summary, write_summary
from fastkd.runtime import create_runtime
from fastkd.teacher_cache import DTYPES


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    is_main: bool = True
    """False on the other ranks of a torchrun job (they print and write nothing)."""


def train(cfg: Config, *, resume: bool = False, progress: bool = True) -> RunResult:
    """`fastkd train`: supervised training of `model.arch`."""
    if cfg.distill is not None:
        raise ConfigError("distill: this config has a distill section; run it with `fastkd distill`")
    return _fit(cfg, resume=resume, progress=progress)


def distill(cfg: Config, *, resume: bool = False, progress: bool = True) -> RunResult:
    """`fastkd distill`: train `model.arch` against the frozen `distill.teacher`."""
    if cfg.distill is None:
        raise ConfigError("distill: `fastkd distill` needs a distill section (at least teacher.arch and "
                          "teacher.checkpoint)")
    return _fit(cfg, resume=resume, progress=progress)


def _fit(cfg: Config, *, resume: bool, progress: bool) -> RunResult:
    with started(cfg.runtime) as runtime:
        resumed = open_run_dir(cfg, resume, runtime.shard.world_size)
        barrier()  # every rank has looked at the run directory before rank 0 creates it
        run = build_run(cfg, runtime, resumed=resumed)
        assert run.student is not None and run.step is not None and run.update is not None
        about = run.teacher.about if run.teacher is not None else None
        cache_digest = about.get("cache_digest") if about else None
        if resumed is not None and resumed.get("teacher_cache_digest") != cache_digest:
            raise CheckpointError(f"--resume: {cfg.run_dir / 'last.pt'} was trained from other teacher logits than "
                                  f"those in {cfg.distill.teacher_cache_path if cfg.distill else '(none)'} now "
                                  "(the teacher cache was recorded again or switched on or off)")
        run_dir = create_run_dir(cfg, runtime, resumed=resumed is not None)
        logger = RunLogger(run_dir, tensorboard=cfg.run.tensorboard, enabled=runtime.is_main)
        loaders, state = run.loaders, TrainState()
        steps_per_epoch = len(loaders.train)
        training = Training(
            step=run.step, model=run.student.raw, update=run.update, train_loader=loaders.train,
            val_loader=loaders.val, lr_at=lambda s: lr_at(s, cfg.optim, steps_per_epoch), runtime=runtime,
            state=state, epochs=cfg.optim.epochs, run_dir=run_dir, logger=logger,
            checkpoint_extra={"arch": cfg.model.arch, "classes": list(loaders.classes),
                              "num_classes": len(loaders.classes), "config": config_to_dict(cfg),
                              "normalization": run.student.normalization.as_dict(),
                              "kind": "train" if cfg.distill is None else "distill", "teacher_cache_digest": cache_digest},
            log_every_steps=cfg.run.log_every_steps, checkpoint_every_steps=cfg.run.checkpoint_every_steps,
            progress=progress, image_size_at=size_schedule(cfg.data).at,
            on_epoch_end=print_epoch if runtime.is_main else None, heads=run.student.heads)
        if resumed is not None:
            restore_training(training, resumed, source=cfg.run_dir / "last.pt")
            logger.truncate_after(state.epoch)
            if runtime.is_main:
                log.info(f"resuming {run_dir} at epoch {state.epoch} (+{state.batches_done} batches), step {state.step}")
        try:
            with stop_on_signals(training.stop):
                fit(training)
        finally:
            logger.close()
        kd = cfg.distill
        extra = {} if kd is None else {"teacher": about, "loss": kd.loss, "temperature": kd.temperature,
                                       "kd_weight": kd.kd_weight, "ce_weight": kd.ce_weight}
        summary = run_summary(cfg, runtime, state, num_classes=len(loaders.classes),
                              num_params=run.student.num_params, extra=extra)
        if runtime.is_main:
            write_summary(run_dir, summary)
        return RunResult(run_dir, summary, runtime.is_main)


def record_teacher_cache(cfg: Config, *, epochs: int | None = None, dtype: str = "fp16", top_k: int | None = None,
                         progress: bool = True) -> dict[str, Any]:
    """`fastkd teacher-cache`: the live teacher's logits on epochs 0..E-1 of the run's training
    stream (`fastkd.teacher_cache_recorder`) into `distill.teacher_cache`; `top_k` (default
    `distill.teacher_cache_top_k`) keeps each sample's K largest logits and a rest logit."""
    kd = cfg.distill
    if kd is None:
        raise ConfigError("distill: `fastkd teacher-cache` needs a distill section (teacher and teacher_cache)")
    if not kd.teacher_cache:
        raise ConfigError("distill.teacher_cache: name the folder to record the teacher's logits into")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    epochs = cfg.optim.epochs if epochs is None else epochs
    if epochs < 1:
        raise ConfigError(f"--epochs: must be >= 1, got {epochs}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"--top-k: must be >= 1, got {top_k}")
    # Every sample of every epoch, the partial last batch's too: a replay at any batch size, with or
    # without data.drop_last, finds each of its samples (their crops do not depend on batching).
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, drop_last=False))
    with started(cfg.runtime) as runtime:
        run = build_run(cfg, runtime, student="none", teacher="live")
        return teacher_cache_recorder.record(run, epochs=epochs, dtype=dtype, progress=progress,
                                             top_k=kd.teacher_cache_top_k if top_k is None else top_k)


def evaluate_checkpoint(cfg: Config, checkpoint_path: Path, *, arch: str | None = None, ema: bool = False
                        ) -> dict[str, Any]:
    """`fastkd eval`: val top-1/top-5 of a checkpoint on the config's validation data (with `ema`,
    of the EMA weights a fastkd checkpoint holds)."""
    checkpoint = load_checkpoint(checkpoint_path, key="--checkpoint")
    fastkd_format = is_fastkd_checkpoint(checkpoint)
    explicit_arch = arch
    arch = arch or (checkpoint["arch"] if fastkd_format else cfg.model.arch)
    if ema and not (fastkd_format and "ema" in checkpoint):
        raise CheckpointError(f"--ema: {checkpoint_path} holds no EMA weights (a fastkd checkpoint of a run with "
                              "model.ema_decay has them)")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, arch=arch))  # validated again: arch exists
    hint = "" if fastkd_format else (
        f" (a plain state_dict is loaded into model.arch, {arch}: pass --arch NAME for another architecture)"
        if explicit_arch is None else " (is --arch the architecture it was saved from?)")
    # A fastkd checkpoint records its model's input normalization, as does an exported state_dict's
    # student.json beside it; otherwise model.mean/std, or the architecture's own.
    normalization = (resolve_normalization(arch, None, None, checkpoint=checkpoint) if fastkd_format else
                     resolve_normalization(arch, cfg.model.mean, cfg.model.std,
                                           checkpoint=_exported_meta(checkpoint_path) or {}))
    weights = Weights((checkpoint["ema"] if ema else checkpoint["model"]) if fastkd_format else checkpoint,
                      normalization, checkpoint_path, list(checkpoint["classes"]) if fastkd_format else None, hint)
    runtime = create_runtime(cfg.runtime)
    run = build_run(cfg, runtime, student=weights, teacher="none")
    assert run.student is not None
    return {"checkpoint": str(checkpoint_path), "arch": arch, **evaluate(run.student.model, run.loaders.val, runtime)}


def _exported_meta(state_dict_path: Path) -> dict[str, Any] | None:
    """The normalization `fastkd export` wrote beside a state_dict (OUT.json), if it is there."""
    try:
        meta = json.loads(state_dict_path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    if isinstance(meta, dict) and "mean" in meta and "std" in meta:
        return {"normalization": {"mean": meta["mean"], "std": meta["std"]}}
    return None
