"""One loop for `train` and `distill`: fit / train_epoch / evaluate, driven by a step object.

The hot path holds no host syncs: meters and the non-finite guard live on the device and are
read at log intervals, epoch ends and before every checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fastkd.checkpoint import copy_checkpoint, save_checkpoint
from fastkd.ema import ModelEma, NoEma
from fastkd.errors import CheckpointError, FastkdError
from fastkd.models import load_weights
from fastkd.metrics import Meter, NonFiniteGuard, RunLogger, percent, topk_correct
from fastkd.optim import optimizer_params, set_lr
from fastkd.runtime import Runtime, rng_state, set_rng_state
from fastkd.steps import Step, StepOutput, frozen_forward
from pipelines.base import Batch, Loader


class Interrupted(Exception):
    """A stop was requested (SIGTERM/SIGINT) and honoured cleanly: what was done so far is on disk
    (`kept` says what, for the user), nothing half-written."""

    def __init__(self, step: int, signum: int, kept: str = "a checkpoint"):
        super().__init__(f"stopped after step {step}")
        self.step = step
        self.signum = signum
        self.kept = kept


class StopFlag:
    """Set from a signal handler; read by the loop between steps (a plain bool, no sync)."""

    def __init__(self) -> None:
        self.signum = 0

    @property
    def requested(self) -> bool:
        return self.signum != 0


_OPEN_SCOPES: list[StopFlag] = []
"""The flags of the stop scopes open now, outermost first (a demo's around its runs' own)."""


@contextlib.contextmanager
def stop_on_signals(flag: StopFlag) -> Iterator[None]:
    """SIGTERM/SIGINT: finish the current step, checkpoint, exit. A second Ctrl-C aborts at once.

    Scopes nest: a signal sets the flag of every open scope (the demo sees its run's stop), and
    a scope opened after a signal reached an enclosing one starts stopped (a stop requested
    while a run was being built ends that run at its first step, not at its end)."""
    def handler(signum: int, frame: Any) -> None:
        if flag.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        for scope in _OPEN_SCOPES:
            scope.signum = signum

    # Registered before the handler changes, the outer scope's copied after: a signal arriving at
    # any point in between reaches this flag (the outer handler also sets every open scope's).
    outer = _OPEN_SCOPES[-1] if _OPEN_SCOPES else None
    _OPEN_SCOPES.append(flag)
    previous: dict[int, Any] = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
        if outer is not None and outer.requested and not flag.requested:
            flag.signum = outer.signum
        yield
    finally:
        _OPEN_SCOPES.remove(flag)
        for number, old in previous.items():
            signal.signal(number, old)


@dataclass
class TrainState:
    epoch: int = 0
    """Completed epochs."""
    step: int = 0
    """Optimizer steps taken."""
    batches_done: int = 0
    """Batches of the current, unfinished epoch (0 at an epoch boundary)."""
    best_top1: float = -1.0
    best_top5: float = -1.0
    best_epoch: int = 0
    train_seconds: float = 0.0
    """Training time over all sessions, evaluation excluded."""
    train_images: int = 0
    wall_seconds: float = 0.0
    """Wall time over all sessions, set-up excluded."""
    last_val: dict[str, float] = field(default_factory=dict)
    last_train: dict[str, float] = field(default_factory=dict)
    best_ema_top1: float = -1.0
    """The EMA weights' best val top-1 (with `model.ema_decay`)."""
    best_ema_epoch: int = 0
    last_val_ema: dict[str, float] = field(default_factory=dict)


class Update:
    """What follows a step's loss: backward through the (possibly disabled) GradScaler, then the
    optimizer step, clipped at `grad_clip_norm` (`apply_update`), and the EMA of the weights.
    The loop and `fastkd bench` run this one object, built once by the engine."""

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, *,
                 grad_clip_norm: float | None = None, ema: ModelEma | NoEma | None = None):
        self.optimizer = optimizer
        self.scaler = scaler
        self.grad_clip_norm = grad_clip_norm
        self.ema = ema if ema is not None else NoEma()
        self.params = optimizer_params(optimizer)

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def backward(self, loss: torch.Tensor) -> None:
        backward(loss, self.optimizer, self.scaler)

    def step(self, step: int) -> None:
        """The optimizer step, then the EMA at `step` (the steps taken, this one included)."""
        apply_update(self.optimizer, self.scaler, self.params, self.grad_clip_norm)
        self.ema.update(step)


@dataclass
class Training:
    """Everything `fit` needs, built by `fastkd.engine`."""

    step: Step
    model: nn.Module
    """The raw student (what checkpoints save and evaluation runs)."""
    update: Update
    train_loader: Loader
    val_loader: Loader
    lr_at: Callable[[int], float]
    runtime: Runtime
    state: TrainState
    epochs: int
    run_dir: Path
    logger: RunLogger
    checkpoint_extra: dict[str, Any]
    """Constant checkpoint fields: arch, classes, config."""
    log_every_steps: int = 50
    checkpoint_every_steps: int = 0
    stop: StopFlag = field(default_factory=StopFlag)
    progress: bool = True
    train_meter: Meter | None = None
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None
    image_size_at: Callable[[int], int] | None = None
    """The training image side of an epoch (the data's size schedule), recorded with its metrics."""
    heads: nn.Module | None = None
    """The student's trainable adapters to the teacher's features (saved and restored with it, never exported)."""

    @property
    def ema(self) -> ModelEma | NoEma:
        """An EMA of the weights (updated after every step, evaluated each epoch), or nothing."""
        return self.update.ema


def fit(t: Training) -> TrainState:
    """Train from `t.state` to `t.epochs`, evaluating and checkpointing after every epoch."""
    state = t.state
    started = time.perf_counter()
    wall_before = state.wall_seconds
    for epoch in range(state.epoch, t.epochs):
        t.train_loader.set_epoch(epoch, state.batches_done)
        t.step.set_epoch(epoch)
        epoch_started = time.perf_counter()
        train_metrics, finished = train_epoch(t)
        if not finished:
            state.wall_seconds = wall_before + time.perf_counter() - started
            save_training_checkpoint(t, best=False)
            raise Interrupted(state.step, t.stop.signum, kept=f"a checkpoint of step {state.step} in {t.run_dir}")
        eval_started = time.perf_counter()
        val_metrics = evaluate(t.model, t.val_loader, t.runtime)
        ema_metrics = evaluate(t.ema.module, t.val_loader, t.runtime) if t.ema.module is not None else {}
        eval_seconds = time.perf_counter() - eval_started
        state.epoch, state.batches_done = epoch + 1, 0
        state.last_train, state.last_val, state.last_val_ema = train_metrics, val_metrics, ema_metrics
        improved = val_metrics["top1"] > state.best_top1
        if improved:
            state.best_top1, state.best_top5, state.best_epoch = val_metrics["top1"], val_metrics["top5"], state.epoch
        ema_improved = bool(ema_metrics) and ema_metrics["top1"] > state.best_ema_top1
        if ema_improved:
            state.best_ema_top1, state.best_ema_epoch = ema_metrics["top1"], state.epoch
        state.wall_seconds = wall_before + time.perf_counter() - started
        save_training_checkpoint(t, best=improved, best_ema=ema_improved)
        record = {
            "epoch": state.epoch, "step": state.step, "lr": t.lr_at(max(state.step - 1, 0)),
            **({"image_size": t.image_size_at(epoch)} if t.image_size_at else {}),
            **{f"train_{k}": v for k, v in train_metrics.items()},
            **{f"val_{k}": v for k, v in val_metrics.items() if k != "count"},
            **{f"val_ema_{k}": v for k, v in ema_metrics.items() if k != "count"},
            "val_images": val_metrics["count"],
            "epoch_seconds": round(eval_started - epoch_started, 3),
            "eval_seconds": round(eval_seconds, 3),
        }
        t.logger.log_epoch(record)
        if t.on_epoch_end is not None:
            t.on_epoch_end(record)
        if t.stop.requested and state.epoch < t.epochs:  # the epoch's checkpoint is already written
            raise Interrupted(state.step, t.stop.signum, kept=f"a checkpoint of step {state.step} in {t.run_dir}")
    return state


def train_epoch(t: Training) -> tuple[dict[str, float], bool]:
    """One epoch (or what is left of it). Returns its metrics and whether it ran to the end."""
    state, runtime = t.state, t.runtime
    t.step.train()
    meter = t.train_meter or Meter(runtime.device)
    t.train_meter = meter
    guard = NonFiniteGuard(runtime.device, first_step=state.step)
    total = len(t.train_loader)
    bar = tqdm(total=total, initial=state.batches_done, desc=f"epoch {state.epoch + 1}/{t.epochs}",
               disable=None if (t.progress and runtime.is_main) else True,  # None: only on a terminal
               dynamic_ncols=True, leave=False)
    images_seen = 0
    window_images, window_started = 0, time.perf_counter()
    started = window_started
    finished = True
    for batch in t.train_loader:
        lr = t.lr_at(state.step)
        t.update.set_lr(lr)
        batch_size = batch.size
        with runtime.no_host_sync():
            train_step(t.step, t.update, batch, meter, guard, state.step + 1)
        state.step += 1
        state.batches_done += 1
        images_seen += batch_size
        window_images += batch_size
        bar.update(1)

        if state.step % t.log_every_steps == 0:
            agree_losses_finite(guard)
            now = time.perf_counter()
            running = _epoch_metrics(meter.compute())
            scalars = {"loss": running.get("loss", math.nan), "lr": lr,
                       "images_per_sec": window_images * runtime.shard.world_size / max(now - window_started, 1e-9)}
            bar.set_postfix(loss=f"{scalars['loss']:.4f}", lr=f"{lr:.4g}", img_s=f"{scalars['images_per_sec']:.0f}")
            t.logger.log_scalars(state.step, scalars, prefix="train/")
            window_images, window_started = 0, now
        if t.checkpoint_every_steps and state.step % t.checkpoint_every_steps == 0 and state.batches_done < total:
            agree_losses_finite(guard)
            save_training_checkpoint(t, best=False)
        if agree_to_stop(t):
            finished = state.batches_done >= total
            if not finished:
                break
    bar.close()
    runtime.synchronize()  # epoch boundary: the time below covers all queued GPU work
    seconds = time.perf_counter() - started
    state.train_seconds += seconds
    state.train_images += images_seen * runtime.shard.world_size
    agree_losses_finite(guard)
    if not finished:
        return {}, False
    meter.all_reduce()
    metrics = _epoch_metrics(meter.compute())
    metrics["images_per_sec"] = round(images_seen * runtime.shard.world_size / max(seconds, 1e-9), 2)
    t.train_meter = None
    return metrics, True


def train_step(step: Step, update: Update, batch: Batch, meter: Meter, guard: NonFiniteGuard,
               number: int) -> StepOutput:
    """Optimizer step `number` (1-based) on `batch`, as `train_epoch` runs it inside `no_host_sync`:
    forward and loss, backward, the update, and the on-device meters and non-finite guard. Queues
    device work only: no host sync, no blocking host-to-device copy."""
    out = step(batch)
    update.backward(out.loss)
    update.step(number)
    size = batch.size
    correct = topk_correct(out.logits.detach(), batch.labels)  # a mixed sample's own label
    meter.update(size, {"loss": out.loss.detach() * size, "top1": correct[0], "top5": correct[1],
                        **{name: value * size for name, value in out.parts.items()}})
    guard.observe(out.loss)
    return out


def backward(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()


def apply_update(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params: list[torch.Tensor],
                 grad_clip_norm: float | None) -> None:
    """Optimizer step through the (possibly disabled) GradScaler, with optional clipping."""
    if grad_clip_norm is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, grad_clip_norm)
    scaler.step(optimizer)
    scaler.update()


def agree_to_stop(t: Training) -> bool:
    """Whether to stop after this step. Collective under torchrun: every rank calls it after
    every step, and at log intervals all of them take the same decision (a stop requested on
    any rank stops all), or the others would wait forever in the next all-reduce."""
    if not t.runtime.distributed:
        return t.stop.requested
    if t.state.step % t.log_every_steps:
        return False
    flag = torch.tensor([float(t.stop.requested)], device=t.runtime.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    stop = bool(flag.item())  # host sync: log interval, distributed only
    if stop and not t.stop.signum:
        t.stop.signum = 15
    return stop


def _epoch_metrics(means: dict[str, float]) -> dict[str, float]:
    out = {}
    for name, value in means.items():
        out[name] = percent(value) if name in ("top1", "top5", "agree") else round(value, 6)
    return out


def agree_losses_finite(guard: NonFiniteGuard) -> None:
    """Stop on a non-finite loss. Collective under torchrun: every rank calls it at the same
    step; all agree on the earliest bad step, so all stop together."""
    bad = guard.first_bad_step()
    if bad is not None:
        raise FastkdError(f"loss became non-finite (nan/inf) at step {bad + 1}; stopped without saving "
                          "that state, the last checkpoint is intact (try a lower optim.lr, "
                          "optim.grad_clip_norm, or runtime.precision bf16/fp32)")


@torch.no_grad()
def evaluate(model: nn.Module, loader: Loader, runtime: Runtime, precision: str | None = None) -> dict[str, float]:
    """Val loss, top-1 and top-5 over every image of the loader (all ranks), in percent."""
    was_training = model.training
    model.eval()
    meter = Meter(runtime.device, names=("loss", "top1", "top5"))  # fixed: a rank may see no batch
    resolved = runtime.resolve_precision(precision)  # type: ignore[arg-type]
    loader.set_epoch(0)
    for batch in loader:
        images, labels = batch.images, batch.labels
        logits = frozen_forward(model, images, autocast=lambda: runtime.autocast(resolved),
                                input_dtype=runtime.input_dtype(resolved))
        correct = topk_correct(logits, labels)
        loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
        meter.update(labels.shape[0], {"loss": loss_sum, "top1": correct[0], "top5": correct[1]})
    meter.all_reduce()
    model.train(was_training)
    metrics = _epoch_metrics(meter.compute())
    metrics["count"] = meter.count
    return metrics


def _rank_state(t: Training) -> dict[str, Any]:
    """What differs between processes: RNG streams, loader position, the epoch's partial meters."""
    return {
        "rng": rng_state(),
        "loader": t.train_loader.state_dict(),
        "train_meter": t.train_meter.state_dict() if t.train_meter is not None and t.state.batches_done else None,
    }


def checkpoint_payload(t: Training, rank_states: list[dict[str, Any]]) -> dict[str, Any]:
    state = t.state
    return {
        **t.checkpoint_extra,
        "model": {k: v.detach().to("cpu", memory_format=torch.contiguous_format)  # host sync: checkpoints only
                  for k, v in t.model.state_dict().items()},
        "epoch": state.epoch,
        "step": state.step,
        "best_top1": state.best_top1,
        "state": asdict(state),
        "optimizer": t.update.optimizer.state_dict(),
        "scaler": t.update.scaler.state_dict(),
        **({"distill_heads": {k: v.detach().to("cpu") for k, v in t.heads.state_dict().items()}}  # host sync: checkpoints
           if t.heads is not None else {}),
        **({"ema": {k: v.detach().to("cpu", memory_format=torch.contiguous_format)  # host sync: checkpoints only
                    for k, v in t.ema.state_dict().items()}} if t.ema.module is not None else {}),
        "world_size": t.runtime.shard.world_size,
        "ranks": rank_states,
    }


def check_weights_finite(t: Training) -> None:
    """Refuse to go on (and to save) with non-finite weights or buffers.

    The loss guard sees each loss before its update; an update that breaks the weights shows
    only in the weights. Every rank holds the same weights, so every rank stops here together.
    """
    tensors = [v for v in t.model.state_dict().values() if v.is_floating_point()]
    if tensors and not bool(torch.stack([torch.isfinite(v).all() for v in tensors]).all()):  # host sync: checkpoints only
        raise FastkdError(f"the weights became non-finite (nan/inf) by step {t.state.step}; stopped without saving "
                          "them, the last checkpoint is intact (try a lower optim.lr, optim.grad_clip_norm, or "
                          "runtime.precision bf16/fp32)")


def save_training_checkpoint(t: Training, *, best: bool, best_ema: bool = False) -> None:
    """last.pt (and best.pt when the epoch improved val top-1, best_ema.pt when it improved the
    EMA weights'). Called on every rank: each contributes its own RNG and loader state; rank 0
    writes. Non-finite weights are never written."""
    check_weights_finite(t)
    mine = _rank_state(t)
    if t.runtime.distributed:
        gathered: list[Any] | None = [None] * t.runtime.shard.world_size if t.runtime.is_main else None
        dist.gather_object(mine, gathered, dst=0)
        rank_states = gathered or []
    else:
        rank_states = [mine]
    if not t.runtime.is_main:
        return
    last = t.run_dir / "last.pt"
    save_checkpoint(last, checkpoint_payload(t, rank_states))
    if best:
        copy_checkpoint(last, t.run_dir / "best.pt")
    if best_ema:
        copy_checkpoint(last, t.run_dir / "best_ema.pt")


def restore_training(t: Training, checkpoint: dict[str, Any], *, source: Path) -> None:
    """Everything `checkpoint_payload` saved, back into the training state: the one place resume reads.

    Weights, optimizer and scaler, the EMA, progress counters, and this rank's RNG streams,
    loader position and partial meters (`fit` then starts the loader at `state.batches_done`).
    """
    shard = t.runtime.shard
    load_weights(t.model, checkpoint["model"], source=source, arch=checkpoint["arch"],
                 num_classes=checkpoint["num_classes"])
    state = TrainState(**checkpoint["state"])
    t.state.__dict__.update(state.__dict__)
    if t.heads is not None:
        if "distill_heads" not in checkpoint:
            raise CheckpointError(f"--resume: {source} holds no distillation adapters (distill.feature/hint were off)")
        t.heads.load_state_dict(checkpoint["distill_heads"])
    t.update.optimizer.load_state_dict(checkpoint["optimizer"])
    if t.ema.module is not None:
        if "ema" not in checkpoint:
            raise CheckpointError(f"--resume: {source} holds no EMA weights (model.ema_decay was off)")
        t.ema.load_state_dict(checkpoint["ema"])
    t.update.scaler.load_state_dict(checkpoint["scaler"])
    mine = checkpoint["ranks"][shard.rank]
    t.train_loader.load_state_dict(mine["loader"])
    if mine["train_meter"] is not None:
        t.train_meter = Meter(t.runtime.device)
        t.train_meter.load_state_dict(mine["train_meter"])
    set_rng_state(mine["rng"])
