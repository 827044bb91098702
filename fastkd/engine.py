"""One run, built once (`build_run`) from a validated config and this process's runtime, in the
order it runs: data, loaders, student, teacher, step, update. Every command takes its run from
here (`fastkd.commands`: train, distill, teacher-cache, eval; `fastkd.bench`).

Everything here that can fail on user input (data, model, weights, teacher, cache) fails before
a command writes anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fastkd.config import Config, ModelConfig
from fastkd.data import build_loaders, checked_dataset
from fastkd.distributed import rank_0_first
from fastkd.ema import ModelEma, NoEma
from fastkd.errors import CheckpointError, ConfigError
from fastkd.features import DistillationHeads, FeatureTaps, StudentWithHeads, build_heads, pooled_width, probe_channels
from fastkd.log import log
from fastkd.loop import Update
from fastkd.losses import distillation_term, hard_distillation_term
from fastkd.models import (Normalization, attach_input_normalization, count_parameters, create_model,
                           describe_class_difference, is_weights_name, load_pretrained, load_weights,
                           resolve_normalization)
from fastkd.optim import create_optimizer
from fastkd.runtime import Runtime, seed_everything
from fastkd.steps import ClassificationStep, DistillationStep, Step
from fastkd.teacher import Teacher, TeacherChoice, live_teacher_view, resolve_teacher
from pipelines.base import Loaders
from pipelines.datasets import Dataset


@dataclass
class Student:
    model: nn.Module
    """As the step calls it (compiled or wrapped for DDP by the runtime; with feature
    distillation, `fastkd.features.StudentWithHeads`)."""
    raw: nn.Module
    """The student alone: what checkpoints save as `model`, evaluation runs and export writes."""
    heads: DistillationHeads | None
    """Its trainable adapters to the teacher's features (trained and saved with it, never exported)."""
    normalization: Normalization
    num_params: int


@dataclass(frozen=True)
class Weights:
    """A checkpoint's weights for the student (`fastkd eval`), loaded strictly, with the input
    normalization they expect and, for a fastkd checkpoint, the classes they were trained on."""
    state_dict: dict[str, torch.Tensor]
    normalization: Normalization
    source: Path
    classes: list[str] | None = None
    hint: str = ""


StudentChoice = Literal["config", "untrained", "none"]
"""The student's starting weights: `model.pretrained`'s (random without it), random whatever it
says (`fastkd bench`: speed does not depend on them), or no student at all (recording a cache)."""


@dataclass
class Run:
    """What a command runs, built once by `build_run`."""
    cfg: Config
    runtime: Runtime
    dataset: Dataset | None
    """The checked file lists (None with synthetic data)."""
    loaders: Loaders
    student: Student | None
    teacher: Teacher | None
    """Live, cached or none (`fastkd.teacher.resolve_teacher`)."""
    step: Step | None
    """Cross-entropy alone, or the distillation loss against the teacher (None: not training)."""
    update: Update | None
    """Optimizer, GradScaler, gradient clipping and EMA (None: not training)."""


def build_run(cfg: Config, runtime: Runtime, *, student: StudentChoice | Weights = "config",
              teacher: TeacherChoice | Teacher = "config", resumed: dict[str, Any] | None = None,
              dataset: Dataset | None = None) -> Run:
    """This rank's run of `cfg`. `student` and `teacher` say which of them it gets (`StudentChoice`,
    `Weights`; `fastkd.teacher.TeacherChoice`, or a `Teacher` the caller built); `resumed`: the
    checkpoint a resumed run continues (its weights are restored with the rest of its state by
    `restore_training`); `dataset`: file lists already checked for this config's data. A run
    trains (has a step and an update) when its student starts from the config or at random."""
    seed_everything(cfg.run.seed + runtime.shard.rank, deterministic=cfg.runtime.deterministic)
    runtime.set_threads(cfg.runtime.threads)
    evaluating = isinstance(student, Weights)
    if dataset is None:
        dataset = checked_dataset(cfg.data, runtime.shard, is_main=runtime.is_main,
                                  splits=("val",) if evaluating else ("train", "val"))
    view = (live_teacher_view(cfg, teacher) if isinstance(teacher, str)
            else cfg.distill.teacher.image_size if cfg.distill is not None and teacher.module is not None else None)
    loaders = build_loaders(cfg.data, spec=runtime.batch_spec, seed=cfg.data_seed, shard=runtime.shard,
                            dataset=dataset, teacher_image_size=view, stage_guard=runtime.no_host_sync)
    if resumed is not None and list(resumed["classes"]) != loaders.classes:
        raise CheckpointError(f"--resume: the dataset's classes differ from those of {cfg.run_dir / 'last.pt'}")
    bare = None if student == "none" else create_student(cfg, runtime, loaders.classes, student, resumed=resumed)
    with runtime.rng_untouched():  # a live teacher's making draws nothing a cached teacher's would not
        resolved = teacher if isinstance(teacher, Teacher) else resolve_teacher(cfg, runtime, dataset, loaders, teacher)
    model = None if bare is None else place_student(cfg, runtime, *bare, teacher=resolved, trainable=not evaluating)
    step, update = None, None
    if model is not None and not evaluating:
        step = build_step(cfg, runtime, model.model, resolved)
        update = build_update(cfg, runtime, model)
    return Run(cfg, runtime, dataset, loaders, model, resolved, step, update)


def create_student(cfg: Config, runtime: Runtime, classes: list[str], start: StudentChoice | Weights, *,
                   resumed: dict[str, Any] | None = None) -> tuple[nn.Module, Normalization]:
    """`model.arch` for `classes`, its weights as `start` says, with its input normalization
    (`fastkd.models.resolve_normalization`), on the host."""
    model_cfg = cfg.model
    model = create_model(model_cfg.arch, len(classes), image_size=cfg.data.image_size)
    if isinstance(start, Weights):
        if start.classes is not None and start.classes != classes:
            raise CheckpointError(f"{start.source}: its classes differ from the dataset's "
                                  f"({describe_class_difference(start.classes, classes)})")
        load_weights(model, start.state_dict, source=start.source, arch=model_cfg.arch, num_classes=len(classes),
                     key="--checkpoint", hint=start.hint)
        normalization = start.normalization
    else:
        if start == "config" and model_cfg.pretrained and resumed is None:  # resumed: the weights are in its checkpoint
            _load_pretrained(model, model_cfg, len(classes), runtime)
        # resumed: the statistics the run started with (the pretrained file need not be there any more)
        recorded = resumed if resumed is not None and resumed.get("normalization") else None
        normalization = resolve_normalization(model_cfg.arch, model_cfg.mean, model_cfg.std,
                                              weights=model_cfg.pretrained if start == "config" else "",
                                              checkpoint=recorded)
    attach_input_normalization(model, normalization)
    if cfg.distill is not None and cfg.distill.token is not None and not isinstance(start, Weights):
        set_distilled_training = getattr(model, "set_distilled_training", None)
        if not callable(set_distilled_training):
            raise ConfigError(f"distill.token: model.arch {model_cfg.arch} has no distillation head (a timm "
                              "*_distilled model has one, e.g. timm:deit_tiny_distilled_patch16_224)")
        set_distilled_training(True)  # in training, its forward returns both heads' logits
    return model, normalization


def place_student(cfg: Config, runtime: Runtime, model: nn.Module, normalization: Normalization, *,
                  teacher: Teacher | None, trainable: bool) -> Student:
    """The student placed on the device by the runtime, with its adapters to the teacher's
    features when the run distils them (`fastkd.features`: one module for DDP)."""
    kd = cfg.distill
    num_params = count_parameters(model)
    if not trainable or kd is None or teacher is None or (kd.feature is None and kd.hint is None):
        module, raw = runtime.prepare_model(model, trainable=trainable)
        return Student(module, raw, None, normalization, num_params)
    layer = kd.hint.student_layer if kd.hint is not None else None
    taps = FeatureTaps(model, pooled=kd.feature is not None, layer=layer, model_key="model.arch",
                       layer_key="distill.hint.student_layer")
    heads = build_heads(pooled_width(model, "model.arch") if kd.feature is not None else None, teacher.feature_width,
                        probe_channels(model, layer, cfg.data.image_size, "distill.hint.student_layer")
                        if layer else None, teacher.hint_channels)
    module, wrapper = runtime.prepare_model(StudentWithHeads(model, heads, taps), trainable=True)
    assert isinstance(wrapper, StudentWithHeads)
    return Student(module, wrapper.student, heads, normalization, num_params)


def _load_pretrained(model: nn.Module, model_cfg: ModelConfig, num_classes: int, runtime: Runtime) -> None:
    fresh = rank_0_first(lambda: load_pretrained(model, model_cfg.pretrained, arch=model_cfg.arch,
                                                 num_classes=num_classes),
                         downloads=is_weights_name(model_cfg.pretrained))
    if runtime.is_main:
        log.info(f"model.pretrained: {model_cfg.arch} initialized from {model_cfg.pretrained}"
                 + (f"; a new classifier for {num_classes} classes ({', '.join(fresh)})" if fresh else ""))


def build_step(cfg: Config, runtime: Runtime, model: nn.Module, teacher: Teacher | None, *,
               side_stream: bool | None = None) -> Step:
    """The run's training step around `model` (prepared by the runtime): cross-entropy alone
    without a teacher, else `cfg.distill`'s loss against the live teacher or its recorded logits.
    `side_stream` overrides `distill.side_stream` (a live teacher's side CUDA stream)."""
    if teacher is None:
        return ClassificationStep(model, autocast=runtime.autocast, label_smoothing=cfg.optim.label_smoothing)
    kd = cfg.distill
    assert kd is not None, "a teacher needs a distill section"
    precision = runtime.resolve_precision(kd.teacher.precision)
    side_stream = kd.side_stream if side_stream is None else side_stream
    hard = kd.token is not None and kd.token.hard
    return DistillationStep(model, teacher.module, term=hard_distillation_term if hard else distillation_term(kd),
                            kd_weight=kd.kd_weight, ce_weight=kd.ce_weight, autocast=runtime.autocast,
                            teacher_autocast=lambda: runtime.autocast(precision),
                            stream=runtime.create_side_stream(side_stream and teacher.module is not None),
                            teacher_input_dtype=runtime.input_dtype(precision),
                            label_smoothing=cfg.optim.label_smoothing, recorded=teacher.recorded,
                            feature_weight=kd.feature.weight if kd.feature is not None else 0.0,
                            hint_weight=kd.hint.weight if kd.hint is not None else 0.0, teacher_taps=teacher.taps,
                            token=kd.token is not None)


def build_ema(cfg: ModelConfig, raw: nn.Module) -> ModelEma | NoEma:
    """The EMA of the student's weights that `model.ema_decay` asks for (else one that does nothing)."""
    return NoEma() if cfg.ema_decay is None else ModelEma(raw, decay=cfg.ema_decay, warmup=cfg.ema_warmup)


def build_update(cfg: Config, runtime: Runtime, student: Student) -> Update:
    """The optimizer (`optim`) over the student and its adapters, the GradScaler (fp16 only),
    clipping, and the EMA of the student's weights."""
    trained = student.raw if student.heads is None else nn.ModuleList([student.raw, student.heads])
    return Update(create_optimizer(trained, cfg.optim, runtime.device), runtime.create_scaler(),
                  grad_clip_norm=cfg.optim.grad_clip_norm, ema=build_ema(cfg.model, student.raw))
