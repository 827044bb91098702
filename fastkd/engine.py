"""Builds a run from a validated config and hands it to the loop: `train`, `distill`, `evaluate`.

Everything that can fail on user input (config, model name, data, teacher, run directory) is
checked before the run directory is created, so a refused run writes nothing.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from fastkd.checkpoint import is_fastkd_checkpoint, load_checkpoint
from fastkd.config import Config, DataConfig, DistillConfig, ModelConfig, changed_keys, config_from_dict, config_to_dict, dump_config
from fastkd.data import build_loaders, crop_range, load_data, size_schedule, stage_description
from fastkd.ema import ModelEma, NoEma
from fastkd.env import collect_env, device_name
from fastkd.errors import CheckpointError, ConfigError, DataError, FastkdError
from fastkd.log import log
from fastkd.loop import StopFlag, TrainState, Training, evaluate, fit
from fastkd.metrics import Meter, RunLogger
from fastkd.losses import distillation_term
from fastkd.models import (Normalization, attach_input_normalization, check_arch, count_parameters, create_model,
                           freeze, is_weights_name, load_pretrained, load_teacher, load_weights, resolve_normalization,
                           weights_identity)
from fastkd.optim import create_optimizer, lr_at
from fastkd.runtime import Runtime, create_runtime, seed_everything, set_rng_state, shard_from_env
from fastkd.steps import ClassificationStep, DistillationStep, frozen_forward
from fastkd.teacher_cache import (DTYPES, CacheKey, CachedTeacher, TeacherCache, dataset_digest, describe_top_k,
                                  effective_top_k, file_sha256)
from pipelines.augment import augmentation_spec
from pipelines import loader_workers
from pipelines.base import Loaders
from pipelines.datasets import Dataset
from pipelines.verify import find_broken_images


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    is_main: bool = True
    """False on the other ranks of a torchrun job (they print and write nothing)."""


@dataclass
class Setup:
    """What every command that reads training data builds first (`prepare`): `train`, `distill`,
    `teacher-cache` and `fastkd bench` alike, so the bench times the loaders and step a run has."""
    cfg: Config
    runtime: Runtime
    dataset: Dataset | None
    """The checked file lists (None with synthetic data)."""
    loaders: Loaders


@contextlib.contextmanager
def started(cfg: Config) -> Iterator[Runtime]:
    """This process's runtime, inside the torchrun job's process group when there is one."""
    shard = shard_from_env()
    runtime = create_runtime(cfg.runtime, shard)
    with _process_group(shard.world_size, runtime):
        yield runtime


def prepare(cfg: Config, runtime: Runtime, *, teacher_view: int | None, dataset: Dataset | None = None) -> Setup:
    """This rank's seeds, the dataset (`checked_dataset`) and the loaders; `teacher_view`: the side of a second view of
    each crop for a teacher with its own input size. `dataset` reuses file lists already loaded
    for this config's data (the bench builds one setup per backend)."""
    seed_everything(cfg.run.seed + runtime.shard.rank, deterministic=cfg.runtime.deterministic)
    if cfg.data.backend == "synthetic":
        dataset = None
    elif dataset is None:
        dataset = checked_dataset(cfg, runtime)
    loaders = build_loaders(cfg.data, spec=runtime.batch_spec, seed=cfg.data_seed, shard=runtime.shard,
                            dataset=dataset, teacher_image_size=teacher_view, stage_guard=runtime.no_host_sync)
    return Setup(cfg, runtime, dataset, loaders)


@dataclass
class Student:
    model: nn.Module
    """As the step calls it (compiled or wrapped for DDP by the runtime)."""
    raw: nn.Module
    """The module whose parameters the optimizer and checkpoints hold."""
    normalization: Normalization
    num_params: int


def build_student(setup: Setup, *, checkpoint: dict[str, Any] | None = None, pretrained: bool = True) -> Student:
    """`model.arch` for the setup's classes, with `model.pretrained`'s weights (unless resuming
    from `checkpoint`, or `pretrained` is False) and its input normalization, on the device."""
    cfg, runtime, classes = setup.cfg, setup.runtime, setup.loaders.classes
    student = create_model(cfg.model.arch, len(classes), image_size=cfg.data.image_size)
    if cfg.model.pretrained and pretrained and checkpoint is None:  # a resumed run's weights are in its checkpoint
        fresh = _rank_0_first(lambda: load_pretrained(student, cfg.model.pretrained, arch=cfg.model.arch,
                                                      num_classes=len(classes)),
                              downloads=is_weights_name(cfg.model.pretrained))
        if runtime.is_main:
            log.info(f"model.pretrained: {cfg.model.arch} initialized from {cfg.model.pretrained}"
                     + (f"; a new classifier for {len(classes)} classes ({', '.join(fresh)})" if fresh else ""))
    # resumed: the statistics the run started with (the pretrained file need not be there any more)
    normalization = (Normalization(tuple(checkpoint["normalization"]["mean"]),
                                   tuple(checkpoint["normalization"]["std"]))
                     if checkpoint is not None and checkpoint.get("normalization")
                     else student_normalization(cfg.model))
    attach_input_normalization(student, normalization)
    num_params = count_parameters(student)
    model, raw = runtime.prepare_model(student, trainable=True)
    return Student(model, raw, normalization, num_params)


def build_ema(cfg: Config, raw: nn.Module) -> ModelEma | NoEma:
    """The EMA of the student's weights that `model.ema_decay` asks for (else one that does nothing)."""
    if cfg.model.ema_decay is None:
        return NoEma()
    return ModelEma(raw, decay=cfg.model.ema_decay, warmup=cfg.model.ema_warmup)


def train(cfg: Config, *, resume: bool = False, progress: bool = True) -> RunResult:
    """`fastkd train`: supervised training of `model.arch`."""
    if cfg.distill is not None:
        raise ConfigError("distill: this config has a distill section; run it with `fastkd distill`")
    return _run(cfg, resume=resume, progress=progress)


def distill(cfg: Config, *, resume: bool = False, progress: bool = True) -> RunResult:
    """`fastkd distill`: train `model.arch` against the frozen `distill.teacher`."""
    if cfg.distill is None:
        raise ConfigError("distill: `fastkd distill` needs a distill section (at least teacher.arch and "
                          "teacher.checkpoint)")
    return _run(cfg, resume=resume, progress=progress)


def record_teacher_cache(cfg: Config, *, epochs: int | None = None, dtype: str = "fp16", top_k: int | None = None,
                         progress: bool = True) -> dict[str, Any]:
    """`fastkd teacher-cache`: run the frozen teacher over epochs 0..E-1 of the run's training
    stream (the exact crops a student will see) and store its logits per (epoch, sample) in
    `distill.teacher_cache`. Finished epochs are kept: a second call resumes or extends it.
    Under torchrun every rank runs the teacher on its shard and sends its rows to rank 0, which
    alone writes the files (no file is shared between processes or nodes). `top_k` (default
    `distill.teacher_cache_top_k`) keeps each sample's K largest logits and a rest logit
    (`fastkd.teacher_cache.encode_top_k`)."""
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
    requested_top_k = kd.teacher_cache_top_k if top_k is None else top_k
    check_arch(kd.teacher.arch, "distill.teacher.arch")
    check_image_sizes(cfg)
    with started(cfg) as runtime:
        setup = prepare(cfg, runtime, teacher_view=kd.teacher.image_size)
        loaders = setup.loaders
        key = teacher_cache_key(cfg, runtime, setup.dataset, loaders.classes)
        teacher, about = load_checked_teacher(cfg, runtime, loaders)
        manifest = None
        top_k = effective_top_k(requested_top_k, len(loaders.classes))
        if requested_top_k is not None and top_k is None and runtime.is_main:
            log.info(f"teacher cache: top-{requested_top_k} keeps all {len(loaders.classes)} classes: recording every "
                     "logit")
        if runtime.is_main:  # rank 0 alone opens the folder; the others record from its manifest
            cache = TeacherCache.create_or_resume(
                kd.teacher_cache_path, key, num_classes=len(loaders.classes), dtype=dtype,
                teacher_val={"val_top1": about["val_top1"], "val_top5": about["val_top5"]},
                recorded_with=_recording_setup(cfg, runtime), top_k=top_k)
            cache.remove_stale_files()  # left by a recording killed midway
            manifest = cache.manifest
        cache = TeacherCache(kd.teacher_cache_path, _from_rank_0(manifest))
        different = cache.key.difference(key)
        if different:  # another rank's data or teacher (another node's copy of them)
            raise ConfigError(f"distill.teacher_cache: rank {runtime.shard.rank}'s run differs from rank 0's "
                              f"({different})")
        precision = runtime.resolve_precision(kd.teacher.precision)
        todo = [epoch for epoch in range(epochs) if epoch not in cache.recorded_epochs]
        for epoch in todo:
            _record_epoch(cache, epoch, teacher, loaders.train, runtime, precision, progress=progress)
        return {"path": str(kd.teacher_cache_path), "epochs": epochs, "recorded_now": todo, "dtype": dtype,
                "top_k": cache.top_k, "num_samples": key.num_samples, "teacher": about}


def _recording_setup(cfg: Config, runtime: Runtime) -> dict[str, Any]:
    """How the logits were computed, beyond the key: replays elsewhere are close, not bit-exact."""
    # the device's model, the same on every rank (not rank k's "cuda:k")
    return {"backend": cfg.data.backend, "dali_device": cfg.data.dali_device, "device": device_name(runtime.device),
            "batch_dtype": str(runtime.batch_spec.dtype), "channels_last": runtime.channels_last,
            "batch_size": cfg.data.batch_size, "world_size": runtime.shard.world_size}


def _record_epoch(cache: TeacherCache, epoch: int, teacher: nn.Module, loader, runtime: Runtime, precision: str, *,
                  progress: bool) -> None:
    rows = cache.new_epoch_file(epoch) if runtime.is_main else None
    written = np.zeros(cache.key.num_samples, dtype=bool)
    dtype = cache.manifest["dtype"]
    largest = float(np.finfo(DTYPES[dtype]).max)
    loader.set_epoch(epoch)
    batches = tqdm(loader.indexed(), total=len(loader), desc=f"teacher logits, epoch {epoch}", leave=False,
                   disable=None if (progress and runtime.is_main) else True)
    for batch in batches:
        indices = batch.indices
        logits = frozen_forward(teacher, batch.teacher_view, autocast=lambda: runtime.autocast(precision),
                                input_dtype=runtime.input_dtype(precision)).float()
        indices = indices.to(runtime.device)
        if runtime.distributed:  # every rank's batch has the same size (shards are padded equal)
            all_logits = [torch.empty_like(logits) for _ in range(runtime.shard.world_size)]
            all_indices = [torch.empty_like(indices) for _ in range(runtime.shard.world_size)]
            dist.all_gather(all_logits, logits)
            dist.all_gather(all_indices, indices)
            logits, indices = torch.cat(all_logits), torch.cat(all_indices)
        # Every rank checks the same gathered rows (so all stop together): an fp16 file would keep
        # an overflowing logit as inf, and a student replaying it would meet a NaN loss.
        peak = float(logits.abs().amax())  # host sync: recording, not training; NaN stays NaN
        if not math.isfinite(peak) or peak > largest:
            if rows is not None:
                del rows
                cache.temp_epoch_path(epoch).unlink(missing_ok=True)
            if not math.isfinite(peak):
                what = "are not finite (nan/inf)"
                hint = ("its forward overflowed in fp16 (set distill.teacher.precision: fp32 or bf16), or its checkpoint "
                        "is broken" if precision == "fp16" else f"its checkpoint is broken (its forward ran in {precision})")
            else:
                what = f"reach {peak:.4g}, beyond {dtype}'s range"
                hint = ("record with --dtype fp32" if not cache.recorded_epochs else
                        f"the cache's epochs so far are {dtype}: delete {cache.path} and record it with --dtype fp32")
                hint += ", or use a teacher that trained stably"
            raise DataError(f"teacher cache: the teacher's logits {what} in epoch {epoch}: {hint}; nothing of this "
                            "epoch was recorded")
        if rows is not None:
            index = indices.cpu().numpy()  # host sync: recording, not training
            cache.write_rows(rows, index, logits)
            written[index] = True
    if rows is None:
        return
    rows.flush()
    del rows
    if not written.all():
        raise DataError(f"teacher cache: epoch {epoch} left {int((~written).sum())} sample(s) without logits")
    cache.commit_epoch(epoch)
    log.info(f"teacher cache: epoch {epoch} recorded ({cache.describe_epochs()})")


def build_step(cfg: Config, runtime: Runtime, model: nn.Module, *, teacher: nn.Module | None = None,
               recorded: CachedTeacher | None = None, side_stream: bool | None = None) -> nn.Module:
    """The run's training step around `model` (prepared by the runtime): cross-entropy alone
    without a teacher, else `cfg.distill`'s loss against the live `teacher` or the `recorded`
    logits. `side_stream` overrides `distill.side_stream` (a live teacher's side CUDA stream)."""
    if teacher is None and recorded is None:
        return ClassificationStep(model, autocast=runtime.autocast, label_smoothing=cfg.optim.label_smoothing)
    kd = cfg.distill
    assert kd is not None, "a teacher needs a distill section"
    teacher_precision = runtime.resolve_precision(kd.teacher.precision)
    side_stream = kd.side_stream if side_stream is None else side_stream
    return DistillationStep(model, teacher, term=distillation_term(kd), kd_weight=kd.kd_weight,
                            ce_weight=kd.ce_weight, autocast=runtime.autocast,
                            teacher_autocast=lambda: runtime.autocast(teacher_precision),
                            stream=runtime.create_side_stream(side_stream and recorded is None),
                            teacher_input_dtype=runtime.input_dtype(teacher_precision),
                            label_smoothing=cfg.optim.label_smoothing, recorded=recorded)


def teacher_module(cfg: Config, runtime: Runtime, classes: list[str], *, weights: bool = True) -> nn.Module:
    """The frozen teacher of `distill.teacher`, with its input normalization, placed on the
    device (rank 0 first when its weights download); `weights` False: random ones instead of
    its checkpoint's (`fastkd bench` without the file: speed does not depend on them)."""
    kd = cfg.distill
    assert kd is not None
    image_size = kd.teacher.image_size or cfg.data.image_size
    if weights:
        teacher = _rank_0_first(lambda: load_teacher(kd.teacher.arch, teacher_source(kd), classes,
                                                     image_size=image_size, mean=kd.teacher.mean, std=kd.teacher.std),
                                downloads=is_weights_name(kd.teacher.checkpoint))
    else:
        teacher = freeze(create_model(kd.teacher.arch, len(classes), image_size=image_size, key="distill.teacher.arch"))
        attach_input_normalization(teacher, resolve_normalization(kd.teacher.arch, kd.teacher.mean, kd.teacher.std))
    return runtime.prepare_model(teacher, trainable=False)[0]


def load_checked_teacher(cfg: Config, runtime: Runtime, loaders: Loaders) -> tuple[nn.Module, dict[str, Any]]:
    """The run's teacher, placed on the device, and its measured val top-1/top-5; a teacher near
    chance level is refused unless `distill.allow_weak_teacher`."""
    kd = cfg.distill
    assert kd is not None
    teacher = teacher_module(cfg, runtime, loaders.classes)
    normalization = teacher.fastkd_normalization
    teacher_precision = runtime.resolve_precision(kd.teacher.precision)
    measured = evaluate(teacher, loaders.val, runtime, precision=teacher_precision)
    chance = 100.0 / len(loaders.classes)
    if runtime.is_main:
        log.info(f"teacher {kd.teacher.arch} ({teacher_source(kd)}): val top1 {measured['top1']:.2f} "
                 f"top5 {measured['top5']:.2f} (chance {chance:.2f})")
    if measured["top1"] < near_chance_top1(len(loaders.classes), measured["count"]) and not kd.allow_weak_teacher:
        raise FastkdError(f"distill.teacher.checkpoint: the teacher's val top-1 is {measured['top1']:.2f}%, near "
                          f"chance ({chance:.2f}%): is {kd.teacher.checkpoint_path} the trained teacher? "
                          "(set distill.allow_weak_teacher: true to distil anyway)")
    return teacher, {"arch": kd.teacher.arch, "checkpoint": str(teacher_source(kd)),
                     "val_top1": measured["top1"], "val_top5": measured["top5"], "precision": teacher_precision,
                     "normalization": normalization.as_dict()}


def teacher_source(kd: DistillConfig) -> Path | str:
    """The teacher's checkpoint file, or the pretrained weights name it gives."""
    return kd.teacher.checkpoint if is_weights_name(kd.teacher.checkpoint) else kd.teacher.checkpoint_path


def teacher_normalization(kd: DistillConfig) -> Normalization:
    """The teacher's input normalization, as `load_teacher` resolves it (without building it)."""
    payload = None if is_weights_name(kd.teacher.checkpoint) else load_checkpoint(kd.teacher.checkpoint_path,
                                                                                   key="distill.teacher.checkpoint")
    if payload is not None and not is_fastkd_checkpoint(payload):
        payload = None
    return resolve_normalization(kd.teacher.arch, kd.teacher.mean, kd.teacher.std, weights=kd.teacher.checkpoint,
                                 checkpoint=payload)


def student_normalization(model: ModelConfig) -> Normalization:
    """The student's input normalization: the config's, or its pretrained weights' own."""
    payload = None
    if model.pretrained and not is_weights_name(model.pretrained):
        payload = load_checkpoint(Path(model.pretrained).expanduser(), key="model.pretrained")
        payload = payload if is_fastkd_checkpoint(payload) else None
    return resolve_normalization(model.arch, model.mean, model.std, weights=model.pretrained, checkpoint=payload)


def teacher_input_size(cfg: Config) -> int | dict[str, int]:
    """The size of the crops the teacher sees: its own (`distill.teacher.image_size`), else the
    student's, which may follow a schedule (then its numbers)."""
    assert cfg.distill is not None
    return cfg.distill.teacher.image_size or size_schedule(cfg.data).describe()


def cache_augmentation(data: DataConfig) -> dict[str, Any]:
    """The training stream's augmentation as a teacher cache records it: the crops and flips,
    and the batch stage's transforms when there are any (a cache without them keeps its key)."""
    stage = stage_description(data)
    return {**augmentation_spec(crop_range(data)), **({"batch_stage": stage} if stage else {})}


def teacher_cache_key(cfg: Config, runtime: Runtime, dataset: Dataset | None, classes: list[str]) -> CacheKey:
    """What a teacher cache must have been recorded for to serve this run."""
    kd = cfg.distill
    assert kd is not None
    if dataset is None:
        raise ConfigError("distill.teacher_cache: a teacher cache needs real data (data.backend torchvision or dali)")
    normalization = teacher_normalization(kd)  # a missing or unreadable teacher is an error here too
    return CacheKey(dataset=dataset_digest(dataset.train.files, dataset.train.labels, cfg.data.root_path),
                    num_samples=len(dataset.train), classes=list(classes), seed=cfg.data_seed,
                    image_size=teacher_input_size(cfg), augmentation=cache_augmentation(cfg.data),
                    teacher_arch=kd.teacher.arch,
                    teacher_checkpoint=(weights_identity(kd.teacher.checkpoint, kd.teacher.arch)
                                        if is_weights_name(kd.teacher.checkpoint)
                                        else file_sha256(kd.teacher.checkpoint_path)),
                    teacher_precision=runtime.resolve_precision(kd.teacher.precision),
                    teacher_normalization=None if normalization.is_imagenet else normalization.as_dict())


@dataclass
class Teacher:
    """Where a distillation step's teacher logits come from: the live `module`, or the
    `recorded` logits of a teacher cache; `about` is what the run's summary says of it."""
    module: nn.Module | None
    recorded: CachedTeacher | None
    about: dict[str, Any]


def open_teacher(setup: Setup) -> Teacher:
    """The run's teacher: its cache, checked against this run, when `distill.teacher_cache` is
    set (no teacher is loaded or run), else the checked live teacher (`load_checked_teacher`)."""
    cfg, runtime, loaders = setup.cfg, setup.runtime, setup.loaders
    kd = cfg.distill
    assert kd is not None
    if not kd.teacher_cache:
        module, about = load_checked_teacher(cfg, runtime, loaders)
        return Teacher(module, None, about)
    key = teacher_cache_key(cfg, runtime, setup.dataset, loaders.classes)
    cache = TeacherCache.open(kd.teacher_cache_path, key, epochs=cfg.optim.epochs,
                              verify=runtime.shard.local_rank == 0,
                              top_k=effective_top_k(kd.teacher_cache_top_k, len(loaders.classes)))
    _barrier()  # the node's files were verified by its first process
    about = {"arch": kd.teacher.arch, "checkpoint": str(kd.teacher.checkpoint_path), **cache.manifest["teacher_val"],
             "precision": key.teacher_precision, "cache": str(kd.teacher_cache_path), "cache_digest": cache.digest,
             "cache_top_k": cache.top_k}
    if runtime.is_main:
        log.info(f"teacher {kd.teacher.arch}: logits from the cache {kd.teacher_cache_path} "
                 f"({cache.describe_epochs()}, {cache.manifest['dtype']}, {describe_top_k(cache.top_k)}); val top1 "
                 f"{about['val_top1']:.2f}")
    return Teacher(None, CachedTeacher(cache, runtime.device), about)


def near_chance_top1(num_classes: int, num_images: int) -> float:
    """Top-1 (percent) below which a teacher is indistinguishable from guessing.

    Twice the chance rate, or chance plus three binomial standard deviations on a small
    validation set, whichever is higher.
    """
    p = 1.0 / num_classes
    three_sigma = 3 * math.sqrt(p * (1 - p) / max(num_images, 1))
    return 100.0 * max(2 * p, p + three_sigma)


def live_teacher_view(cfg: Config) -> int | None:
    """The side of the second view of each crop a live teacher needs (`distill.teacher.image_size`);
    None when the teacher sees the student's batch or its logits come from a cache."""
    kd = cfg.distill
    return kd.teacher.image_size if kd is not None and not kd.teacher_cache else None


def check_image_sizes(cfg: Config) -> None:
    """Models built for one input size (ViTs) cannot follow a size schedule or another val size."""
    models = [("model.arch", cfg.model.arch, cfg.data.image_size)]
    if cfg.distill is not None:
        models.append(("distill.teacher.arch", cfg.distill.teacher.arch,
                       cfg.distill.teacher.image_size or cfg.data.image_size))
    data = cfg.data
    for key, arch, size in models:
        if arch.startswith("vit_") and (data.start_image_size is not None or data.val_crop_size != size):
            raise ConfigError(f"{key}: {arch} takes {size} px inputs only; it cannot train with data.start_image_size "
                              f"or be validated at data.val_image_size {data.val_crop_size}")


def _run(cfg: Config, *, resume: bool, progress: bool) -> RunResult:
    check_arch(cfg.model.arch)
    if cfg.distill is not None:
        check_arch(cfg.distill.teacher.arch, "distill.teacher.arch")
    check_image_sizes(cfg)
    with started(cfg) as runtime:
        checkpoint = _open_run_dir(cfg, resume, runtime.shard.world_size)
        _barrier()  # every rank has looked at the run directory before rank 0 creates it
        setup = prepare(cfg, runtime, teacher_view=live_teacher_view(cfg))
        loaders = setup.loaders
        if checkpoint is not None and list(checkpoint["classes"]) != loaders.classes:
            raise CheckpointError(f"--resume: the dataset's classes differ from those of {cfg.run_dir / 'last.pt'}")
        student = build_student(setup, checkpoint=checkpoint)
        normalization, num_params, raw = student.normalization, student.num_params, student.raw
        if cfg.distill is None:
            step, extra_summary = build_step(cfg, runtime, student.model), {}
        else:
            teacher = open_teacher(setup)
            step = build_step(cfg, runtime, student.model, teacher=teacher.module, recorded=teacher.recorded)
            kd = cfg.distill
            extra_summary = {"teacher": teacher.about, "loss": kd.loss, "temperature": kd.temperature,
                             "kd_weight": kd.kd_weight, "ce_weight": kd.ce_weight}
        cache_digest = extra_summary.get("teacher", {}).get("cache_digest")
        if checkpoint is not None and checkpoint.get("teacher_cache_digest") != cache_digest:
            raise CheckpointError(f"--resume: {cfg.run_dir / 'last.pt'} was trained from other teacher logits than "
                                  f"those in {cfg.distill.teacher_cache_path if cfg.distill else '(none)'} now "
                                  "(the teacher cache was recorded again or switched on or off)")
        optimizer = create_optimizer(raw, cfg.optim, runtime.device)
        scaler = runtime.create_scaler()
        state = TrainState()
        steps_per_epoch = len(loaders.train)

        run_dir = cfg.run_dir
        if runtime.is_main and checkpoint is None:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise FastkdError(f"cannot create run directory {run_dir}: {exc.strerror or exc}") from None
            (run_dir / "config.yaml").write_text(dump_config(cfg))
        if runtime.is_main:
            for stale in run_dir.glob(".*.tmp-*"):  # left by a process killed while writing
                stale.unlink(missing_ok=True)
            (run_dir / "env.json").write_text(json.dumps(collect_env(runtime.device), indent=2) + "\n")
        logger = RunLogger(run_dir, tensorboard=cfg.run.tensorboard, enabled=runtime.is_main)
        training = Training(
            step=step, model=raw, optimizer=optimizer, scaler=scaler, train_loader=loaders.train,
            val_loader=loaders.val, lr_at=lambda s: lr_at(s, cfg.optim, steps_per_epoch), runtime=runtime,
            state=state, epochs=cfg.optim.epochs, run_dir=run_dir, logger=logger,
            checkpoint_extra={"arch": cfg.model.arch, "classes": list(loaders.classes),
                              "num_classes": len(loaders.classes), "config": config_to_dict(cfg),
                              "normalization": normalization.as_dict(),
                              "kind": "train" if cfg.distill is None else "distill", "teacher_cache_digest": cache_digest},
            grad_clip_norm=cfg.optim.grad_clip_norm, log_every_steps=cfg.run.log_every_steps,
            checkpoint_every_steps=cfg.run.checkpoint_every_steps, progress=progress,
            image_size_at=size_schedule(cfg.data).at,
            ema=build_ema(cfg, raw))
        if checkpoint is not None:
            restore_training(training, checkpoint, source=cfg.run_dir / "last.pt")
            logger.truncate_after(state.epoch)
            if runtime.is_main:
                log.info(f"resuming {run_dir} at epoch {state.epoch} (+{state.batches_done} batches), step {state.step}")
        if runtime.is_main:
            training.on_epoch_end = _print_epoch
        try:
            with _stop_on_signals(training.stop):
                fit(training)
        finally:
            logger.close()
        summary = _summary(cfg, runtime, state, loaders, num_params, extra_summary)
        if runtime.is_main:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return RunResult(run_dir, summary, runtime.is_main)


def _open_run_dir(cfg: Config, resume: bool, world_size: int) -> dict[str, Any] | None:
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
    saved = config_from_dict(checkpoint["config"])
    changed = changed_keys(saved, cfg)
    if changed:
        raise ConfigError(f"--resume: the config differs from the run's in {', '.join(changed)} "
                          f"(resume with {run_dir / 'config.yaml'})")
    return checkpoint


def restore_training(t: Training, checkpoint: dict[str, Any], *, source: Path) -> None:
    """Everything a checkpoint holds, back into the training state: the one place resume reads.

    Weights, optimizer and scaler, progress counters, and this rank's RNG streams, loader
    position and partial meters (the loop then starts the loader at `state.batches_done`).
    """
    shard = t.runtime.shard
    load_weights(t.model, checkpoint["model"], source=source, arch=checkpoint["arch"],
                 num_classes=checkpoint["num_classes"])
    state = TrainState(**checkpoint["state"])
    t.state.__dict__.update(state.__dict__)
    t.optimizer.load_state_dict(checkpoint["optimizer"])
    if t.ema.module is not None:
        if "ema" not in checkpoint:
            raise CheckpointError(f"--resume: {source} holds no EMA weights (model.ema_decay was off)")
        t.ema.load_state_dict(checkpoint["ema"])
    t.scaler.load_state_dict(checkpoint["scaler"])
    mine = checkpoint["ranks"][shard.rank]
    t.train_loader.load_state_dict(mine["loader"])
    if mine["train_meter"] is not None:
        t.train_meter = Meter(t.runtime.device)
        t.train_meter.load_state_dict(mine["train_meter"])
    set_rng_state(mine["rng"])


def checked_dataset(cfg: Config, runtime: Runtime) -> Dataset | None:
    """The run's file lists (the demo's images made first if `data.generate_demo`), with
    undecodable images refused (or dropped with data.skip_broken); None with synthetic data."""
    _ensure_demo_data(cfg, runtime)
    if cfg.data.backend == "synthetic":
        return None
    dataset = load_data(cfg.data)
    if not cfg.data.verify_images:
        return dataset
    files = dataset.train.files + dataset.val.files
    workers = max(1, loader_workers(cfg.data.num_workers, runtime.shard))
    broken = []
    for turn in (True, False):  # rank 0 decodes and caches; the others then read the cache
        if runtime.is_main == turn:
            broken = find_broken_images(files, root=cfg.data.root_path, workers=workers, progress=runtime.is_main)
        _barrier()
    if not broken:
        return dataset
    first = broken[0]
    if not cfg.data.skip_broken:
        more = f" and {len(broken) - 1} more" if len(broken) > 1 else ""
        raise DataError(f"cannot decode {first.path} ({first.reason}){more}; list them with `fastkd data verify "
                        f"{cfg.data.root}`, or set data.skip_broken: true to train without them")
    if runtime.is_main:
        log.warning(f"warning: training without {len(broken)} image(s) that cannot be decoded:")
        for item in broken:
            log.warning(f"  {item.path}: {item.reason}")
    drop = {item.path for item in broken}
    return Dataset(dataset.classes, dataset.train.without(drop), dataset.val.without(drop))


def _ensure_demo_data(cfg: Config, runtime: Runtime) -> None:
    if not cfg.data.generate_demo:
        return
    if runtime.is_main:
        from fastkd.synth import ensure_demo_dataset

        ensure_demo_dataset(cfg.data.root_path)
    _barrier()


def _from_rank_0(value: Any) -> Any:
    """Rank 0's `value` on every rank (itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _exported_meta(state_dict_path: Path) -> dict[str, Any] | None:
    """The normalization `fastkd export` wrote beside a state_dict (OUT.json), if it is there."""
    meta_path = state_dict_path.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(meta, dict) and "mean" in meta and "std" in meta:
        return {"normalization": {"mean": meta["mean"], "std": meta["std"]}}
    return None


def _rank_0_first(load: Callable[[], Any], *, downloads: bool) -> Any:
    """`load()` on every rank; when it downloads, rank 0 first (into the shared cache) and the
    other ranks after it, so that one process per node fetches the file rather than all at once."""
    if not downloads or not dist.is_initialized():
        return load()
    if dist.get_rank() != 0:
        _barrier()
    result = load()
    if dist.get_rank() == 0:
        _barrier()
    return result


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _process_group(world_size: int, runtime: Runtime) -> Iterator[None]:
    if world_size <= 1 or (dist.is_available() and dist.is_initialized()):
        yield
        return
    # The backend follows the device this process trains on, not what the host has: CPU
    # processes on a GPU host (runtime.device: cpu) all-reduce CPU tensors, which NCCL cannot.
    device_id = runtime.device if runtime.device.type == "cuda" else None
    dist.init_process_group(backend=runtime.process_group_backend, device_id=device_id)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _stop_on_signals(flag: StopFlag) -> Iterator[None]:
    """SIGTERM/SIGINT: finish the current step, checkpoint, exit. A second Ctrl-C aborts at once."""

    def handler(signum: int, frame: Any) -> None:
        if flag.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.signum = signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _print_epoch(record: dict[str, Any]) -> None:
    parts = "".join(f" {name} {record[f'train_{name}']:.4f}" for name in ("ce", "kd") if f"train_{name}" in record
                    and "train_kd" in record)
    agree = f" agree {record['train_agree']:5.1f}" if "train_agree" in record else ""
    ema = f" (ema top1 {record['val_ema_top1']:6.2f})" if "val_ema_top1" in record else ""
    log.info(f"epoch {record['epoch']:>3}  train loss {record['train_loss']:.4f}{parts} top1 {record['train_top1']:6.2f}"
             f"{agree}  val loss {record['val_loss']:.4f} top1 {record['val_top1']:6.2f} top5 {record['val_top5']:6.2f}"
             f"{ema}  {record['train_images_per_sec']:8.1f} img/s  {record['epoch_seconds']:.1f}s")


def _summary(cfg: Config, runtime: Runtime, state: TrainState, loaders: Loaders, num_params: int,
             extra: dict[str, Any]) -> dict[str, Any]:
    final_train, final_val = state.last_train, state.last_val
    return {
        "run": cfg.run.name,
        "kind": "distill" if cfg.distill is not None else "train",
        "model": cfg.model.arch,
        "num_params": num_params,
        "num_classes": len(loaders.classes),
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


def evaluate_checkpoint(cfg: Config, checkpoint_path: Path, *, arch: str | None = None, ema: bool = False
                        ) -> dict[str, Any]:
    """`fastkd eval`: val top-1/top-5 of a checkpoint on the config's validation data (with `ema`,
    of the EMA weights a fastkd checkpoint holds)."""
    runtime = create_runtime(cfg.runtime)
    checkpoint = load_checkpoint(checkpoint_path, key="--checkpoint")
    fastkd_format = is_fastkd_checkpoint(checkpoint)
    explicit_arch = arch
    arch = arch or (checkpoint["arch"] if fastkd_format else cfg.model.arch)
    check_arch(arch)
    loaders = build_loaders(cfg.data, spec=runtime.batch_spec, seed=cfg.data_seed)
    if fastkd_format and list(checkpoint["classes"]) != loaders.classes:
        raise CheckpointError(f"{checkpoint_path}: its classes differ from the dataset's "
                              f"({len(checkpoint['classes'])} vs {len(loaders.classes)} classes)")
    model = create_model(arch, len(loaders.classes), image_size=cfg.data.image_size)
    if ema and not (fastkd_format and "ema" in checkpoint):
        raise CheckpointError(f"--ema: {checkpoint_path} holds no EMA weights (a fastkd checkpoint of a run with "
                              "model.ema_decay has them)")
    state_dict = (checkpoint["ema"] if ema else checkpoint["model"]) if fastkd_format else checkpoint
    hint = "" if fastkd_format else (
        f" (a plain state_dict is loaded into model.arch, {arch}: pass --arch NAME for another architecture)"
        if explicit_arch is None else " (is --arch the architecture it was saved from?)")
    load_weights(model, state_dict, source=checkpoint_path, arch=arch, num_classes=len(loaders.classes),
                 key="--checkpoint", hint=hint)
    # A fastkd checkpoint records its model's input normalization, as does an exported state_dict's
    # student.json beside it; otherwise model.mean/std, or the architecture's own.
    normalization = (resolve_normalization(arch, None, None, checkpoint=checkpoint) if fastkd_format else
                     resolve_normalization(arch, cfg.model.mean, cfg.model.std,
                                           checkpoint=_exported_meta(checkpoint_path)))
    attach_input_normalization(model, normalization)
    model, _ = runtime.prepare_model(model, trainable=False)
    metrics = evaluate(model, loaders.val, runtime)
    return {"checkpoint": str(checkpoint_path), "arch": arch, **metrics}

