"""A run's directory: checked (or its last checkpoint read back for `--resume`) before anything
is built, created once everything that could be refused has passed, and its summary.

    runs/<name>/ config.yaml env.json metrics.jsonl last.pt best.pt [best_ema.pt] summary.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fastkd.checkpoint import is_fastkd_checkpoint, load_checkpoint
from fastkd.config import Config, changed_keys, config_from_dict, dump_config, upgrade_saved_config
from fastkd.env import collect_env
from fastkd.errors import CheckpointError, ConfigError, FastkdError
from fastkd.log import log
from fastkd.loop import TrainState
from fastkd.runtime import Runtime


def open_run_dir(cfg: Config, resume: bool, world_size: int) -> dict[str, Any] | None:
    """Validate the run directory; on resume, return its last checkpoint."""
    run_dir = cfg.run_dir
    if not resume:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise FastkdError(f"run directory already exists: {run_dir} (continue it with --resume, "
                              "or choose another run.name)")
        return None
    last = run_dir / "last.pt"
    if not last.is_file():
        raise CheckpointError(f"--resume: nothing to resume in {run_dir} (no last.pt)")
    checkpoint = load_checkpoint(last)
    if not is_fastkd_checkpoint(checkpoint):
        raise CheckpointError(f"--resume: {last} is not a fastkd checkpoint")
    if checkpoint["world_size"] != world_size:
        raise CheckpointError(f"--resume: {last} was written by {checkpoint['world_size']} process(es); resume "
                              f"with the same number (now {world_size}) to continue the same data streams")
    saved = config_from_dict(upgrade_saved_config(checkpoint["config"]))
    changed = changed_keys(saved, cfg)
    if "data.drop_last" in changed and "drop_last" not in (checkpoint["config"].get("data") or {}):
        # saved before the key existed: its config.yaml lacks it too, so that file alone would not do
        raise ConfigError(f"--resume: {last} was saved before data.drop_last existed and trains on every partial "
                          "last batch; resume it with data.drop_last=false")
    if changed:
        raise ConfigError(f"--resume: the config differs from the run's in {', '.join(changed)} "
                          f"(resume with {run_dir / 'config.yaml'})")
    return checkpoint


def create_run_dir(cfg: Config, runtime: Runtime, *, resumed: bool) -> Path:
    """The run directory with the resolved config (a new run) and this session's environment;
    files a process killed while writing left behind go. Rank 0 alone writes."""
    run_dir = cfg.run_dir
    if not runtime.is_main:
        return run_dir
    if not resumed:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FastkdError(f"cannot create run directory {run_dir}: {exc.strerror or exc}") from None
        (run_dir / "config.yaml").write_text(dump_config(cfg))
    for stale in run_dir.glob(".*.tmp-*"):  # left by a process killed while writing
        stale.unlink(missing_ok=True)
    (run_dir / "env.json").write_text(json.dumps(collect_env(runtime.device), indent=2) + "\n")
    return run_dir


def print_epoch(record: dict[str, Any]) -> None:
    """One line per finished epoch on the console (rank 0's `fit.on_epoch_end`)."""
    terms = [name for name in ("ce", "kd", "feature", "hint") if f"train_{name}" in record]
    parts = "".join(f" {name} {record[f'train_{name}']:.4f}" for name in terms) if len(terms) > 1 else ""
    agree = f" agree {record['train_agree']:5.1f}" if "train_agree" in record else ""
    ema = f" (ema top1 {record['val_ema_top1']:6.2f})" if "val_ema_top1" in record else ""
    log.info(f"epoch {record['epoch']:>3}  train loss {record['train_loss']:.4f}{parts} top1 {record['train_top1']:6.2f}"
             f"{agree}  val loss {record['val_loss']:.4f} top1 {record['val_top1']:6.2f} top5 {record['val_top5']:6.2f}"
             f"{ema}  {record['train_images_per_sec']:8.1f} img/s  {record['epoch_seconds']:.1f}s")


def run_summary(cfg: Config, runtime: Runtime, state: TrainState, *, num_classes: int, num_params: int,
                extra: dict[str, Any]) -> dict[str, Any]:
    """summary.json: the run's results, speed and where it ran."""
    final_train, final_val = state.last_train, state.last_val
    return {
        "run": cfg.run.name,
        "kind": "distill" if cfg.distill is not None else "train",
        "model": cfg.model.arch,
        "num_params": num_params,
        "num_classes": num_classes,
        "backend": cfg.data.backend,
        "epochs": state.epoch,
        "steps": state.step,
        "best_val_top1": state.best_top1,
        "best_val_top5": state.best_top5,
        "best_epoch": state.best_epoch,
        "final_val_top1": final_val.get("top1"),
        "final_val_top5": final_val.get("top5"),
        "final_train_top1": final_train.get("top1"),
        "train_val_gap": (round(final_train["top1"] - final_val["top1"], 4)
                          if "top1" in final_train and "top1" in final_val else None),
        **({"best_ema_val_top1": state.best_ema_top1, "best_ema_epoch": state.best_ema_epoch,
            "final_ema_val_top1": state.last_val_ema.get("top1"), "ema_decay": cfg.model.ema_decay}
           if cfg.model.ema_decay is not None else {}),
        "images_per_sec": round(state.train_images / state.train_seconds, 2) if state.train_seconds else None,
        "train_seconds": round(state.train_seconds, 2),
        "wall_seconds": round(state.wall_seconds, 2),
        "world_size": runtime.shard.world_size,
        "batch_size": cfg.data.batch_size,
        "global_batch_size": cfg.data.batch_size * runtime.shard.world_size,
        "device": collect_env(runtime.device)["device"],
        "precision": runtime.precision,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
