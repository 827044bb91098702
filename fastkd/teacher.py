"""The run's teacher, resolved once into one value (`Teacher`): live (a frozen module, checked
against the validation data), cached (its recorded logits: `fastkd.teacher_cache`), or none.

Everything about a teacher lives here: where its weights come from, its input normalization
(through `fastkd.models.resolve_normalization`, the one place normalizations are decided), the
size of the crops it sees, the key a teacher cache must have been recorded with to serve the run,
and the check that refuses a teacher near chance level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import nn

from fastkd.config import Config, DataConfig, DistillConfig
from fastkd.data import crop_range, size_schedule, stage_description
from fastkd.distributed import barrier, rank_0_first
from fastkd.errors import ConfigError, FastkdError
from fastkd.log import log
from fastkd.loop import evaluate
from fastkd.models import (Normalization, attach_input_normalization, create_model, freeze, input_normalization,
                           is_weights_name, load_teacher, resolve_normalization, weights_identity)
from fastkd.runtime import Runtime
from fastkd.features import FeatureTaps, pooled_width, probe_channels
from fastkd.teacher_cache import (FEATURES, CacheKey, CachedTeacher, TeacherCache, dataset_digest, describe_top_k,
                                  effective_top_k, file_sha256)
from pipelines.augment import augmentation_spec
from pipelines.base import Loaders
from pipelines.datasets import Dataset

TeacherChoice = Literal["config", "live", "none"]
"""Which teacher a run gets: the distill section's (its cache when `distill.teacher_cache` is
set, else live), the live one whatever the section says (recording a cache), or none."""


@dataclass
class Teacher:
    """Where a distillation step's teacher outputs come from: the live `module`, or the
    `recorded` outputs of a teacher cache (exactly one); `about` is what the run's summary says of it."""

    module: nn.Module | None
    recorded: CachedTeacher | None
    about: dict[str, Any]
    taps: FeatureTaps | None = None
    """The live teacher's pooled features and hint layer, captured in its forward (`distill.feature`, `distill.hint`)."""
    feature_width: int | None = None
    """The width of its pooled pre-logit features, with `distill.feature`."""
    hint_channels: int | None = None
    """The channels of its hint layer's output, with `distill.hint`."""


def teacher_source(kd: DistillConfig) -> Path | str:
    """The teacher's checkpoint file, or the pretrained weights name it gives."""
    return kd.teacher.checkpoint if is_weights_name(kd.teacher.checkpoint) else kd.teacher.checkpoint_path


def teacher_normalization(kd: DistillConfig) -> Normalization:
    """The teacher's input normalization, as `load_teacher` resolves it (without building it)."""
    return resolve_normalization(kd.teacher.arch, kd.teacher.mean, kd.teacher.std, weights=teacher_source(kd),
                                 key="distill.teacher.checkpoint")


def teacher_input_size(cfg: Config) -> int | dict[str, int]:
    """The size of the crops the teacher sees: its own (`distill.teacher.image_size`), else the
    student's, which may follow a schedule (then its numbers)."""
    assert cfg.distill is not None
    return cfg.distill.teacher.image_size or size_schedule(cfg.data).describe()


def live_teacher_view(cfg: Config, choice: TeacherChoice = "config") -> int | None:
    """The side of the second view of each crop a live teacher needs (`distill.teacher.image_size`);
    None when the teacher sees the student's batch or its logits come from a cache."""
    kd = cfg.distill
    if kd is None or choice == "none" or (choice == "config" and kd.teacher_cache):
        return None
    return kd.teacher.image_size


def cache_augmentation(data: DataConfig) -> dict[str, Any]:
    """The training stream's augmentation as a teacher cache records it: the crops and flips,
    and the batch stage's transforms when there are any (a cache without them keeps its key)."""
    stage = stage_description(data)
    return {**augmentation_spec(crop_range(data)), **({"batch_stage": stage} if stage else {})}


def teacher_cache_key(cfg: Config, runtime: Runtime, dataset: Dataset | None, classes: list[str]) -> CacheKey:
    """What a teacher cache must have been recorded for to serve this run."""
    kd = cfg.distill
    assert kd is not None and dataset is not None, "a teacher cache needs a distill section and real data"
    normalization = teacher_normalization(kd)  # a missing or unreadable teacher is an error here too
    return CacheKey(dataset=dataset_digest(dataset.train.files, dataset.train.labels, cfg.data.root_path),
                    num_samples=len(dataset.train), classes=list(classes), seed=cfg.data_seed,
                    image_size=teacher_input_size(cfg), augmentation=cache_augmentation(cfg.data),
                    teacher_arch=kd.teacher.arch,
                    teacher_checkpoint=(weights_identity(kd.teacher.checkpoint, kd.teacher.arch)
                                        if is_weights_name(kd.teacher.checkpoint)
                                        else file_sha256(kd.teacher.checkpoint_path)),
                    teacher_precision=runtime.resolve_precision(kd.teacher.precision),
                    teacher_normalization=None if normalization.is_imagenet else normalization.as_dict(),
                    features=FEATURES if kd.feature is not None else None)


def build_live_teacher(cfg: Config, runtime: Runtime, classes: list[str], *, weights: bool = True) -> Teacher:
    """The frozen teacher of `distill.teacher`, with its input normalization and the taps feature
    distillation reads, placed on the device (rank 0 first when its weights download); `weights`
    False: random ones instead of its checkpoint's (`fastkd bench` without the file: speed does
    not depend on them)."""
    kd = cfg.distill
    assert kd is not None
    image_size = kd.teacher.image_size or cfg.data.image_size
    if weights:
        teacher = rank_0_first(lambda: load_teacher(kd.teacher.arch, teacher_source(kd), classes,
                                                    image_size=image_size, mean=kd.teacher.mean, std=kd.teacher.std),
                               downloads=is_weights_name(kd.teacher.checkpoint))
    else:
        teacher = freeze(create_model(kd.teacher.arch, len(classes), image_size=image_size, key="distill.teacher.arch"))
        attach_input_normalization(teacher, resolve_normalization(kd.teacher.arch, kd.teacher.mean, kd.teacher.std))
    layer = kd.hint.teacher_layer if kd.hint is not None else None
    taps = (FeatureTaps(teacher, pooled=kd.feature is not None, layer=layer, model_key="distill.teacher.arch",
                        layer_key="distill.hint.teacher_layer") if kd.feature is not None or layer else None)
    return Teacher(runtime.prepare_model(teacher, trainable=False)[0], None, {"arch": kd.teacher.arch}, taps=taps,
                   feature_width=pooled_width(teacher, "distill.teacher.arch") if kd.feature is not None else None,
                   hint_channels=(probe_channels(teacher, layer, image_size, "distill.hint.teacher_layer")
                                  if layer else None))


def near_chance_top1(num_classes: int, num_images: int) -> float:
    """Top-1 (percent) below which a teacher is indistinguishable from guessing.

    Twice the chance rate, or chance plus three binomial standard deviations on a small
    validation set, whichever is higher.
    """
    p = 1.0 / num_classes
    three_sigma = 3 * math.sqrt(p * (1 - p) / max(num_images, 1))
    return 100.0 * max(2 * p, p + three_sigma)


def load_checked_teacher(cfg: Config, runtime: Runtime, loaders: Loaders) -> Teacher:
    """The run's live teacher, placed on the device, and its measured val top-1/top-5; a teacher
    near chance level is refused unless `distill.allow_weak_teacher`."""
    kd = cfg.distill
    assert kd is not None
    live = build_live_teacher(cfg, runtime, loaders.classes)
    teacher = live.module
    assert teacher is not None
    precision = runtime.resolve_precision(kd.teacher.precision)
    measured = evaluate(teacher, loaders.val, runtime, precision=precision)
    chance = 100.0 / len(loaders.classes)
    if runtime.is_main:
        log.info(f"teacher {kd.teacher.arch} ({teacher_source(kd)}): val top1 {measured['top1']:.2f} "
                 f"top5 {measured['top5']:.2f} (chance {chance:.2f})")
    if measured["top1"] < near_chance_top1(len(loaders.classes), int(measured["count"])) and not kd.allow_weak_teacher:
        raise FastkdError(f"distill.teacher.checkpoint: the teacher's val top-1 is {measured['top1']:.2f}%, near "
                          f"chance ({chance:.2f}%): is {kd.teacher.checkpoint_path} the trained teacher? "
                          "(set distill.allow_weak_teacher: true to distil anyway)")
    live.about.update(checkpoint=str(teacher_source(kd)), val_top1=measured["top1"], val_top5=measured["top5"],
                      precision=precision, normalization=input_normalization(teacher).as_dict())
    return live


def open_cached_teacher(cfg: Config, runtime: Runtime, dataset: Dataset | None, classes: list[str]) -> Teacher:
    """The run's teacher cache (`distill.teacher_cache`), checked against this run: its key, its
    kind of rows and every epoch file the run needs (no teacher is loaded or run)."""
    kd = cfg.distill
    assert kd is not None
    if dataset is None:
        raise ConfigError("distill.teacher_cache: a teacher cache needs real data (data.backend torchvision or dali)")
    key = teacher_cache_key(cfg, runtime, dataset, classes)
    cache = TeacherCache.open(kd.teacher_cache_path, key, epochs=cfg.optim.epochs,
                              verify=runtime.shard.local_rank == 0,
                              top_k=effective_top_k(kd.teacher_cache_top_k, len(classes)))
    barrier()  # the node's files were verified by its first process
    about = {"arch": kd.teacher.arch, "checkpoint": str(kd.teacher.checkpoint_path), **cache.manifest["teacher_val"],
             "precision": key.teacher_precision, "cache": str(kd.teacher_cache_path), "cache_digest": cache.digest,
             "cache_top_k": cache.top_k}
    if runtime.is_main:
        log.info(f"teacher {kd.teacher.arch}: logits from the cache {kd.teacher_cache_path} "
                 f"({cache.describe_epochs()}, {cache.manifest['dtype']}, {describe_top_k(cache.top_k)}); val top1 "
                 f"{about['val_top1']:.2f}")
    return Teacher(None, CachedTeacher(cache, runtime.device, features=kd.feature is not None), about,
                   feature_width=cache.feature_width if kd.feature is not None else None)


def resolve_teacher(cfg: Config, runtime: Runtime, dataset: Dataset | None, loaders: Loaders,
                    choice: TeacherChoice = "config") -> Teacher | None:
    """The run's teacher as `choice` says (`TeacherChoice`); None without a distill section."""
    kd = cfg.distill
    if kd is None or choice == "none":
        return None
    if choice == "config" and kd.teacher_cache:
        return open_cached_teacher(cfg, runtime, dataset, loaders.classes)
    return load_checked_teacher(cfg, runtime, loaders)
