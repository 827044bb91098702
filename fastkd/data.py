"""The data section of a config turned into a backend's loaders: the one place where
`DataConfig` meets `pipelines/`, which takes explicit values only."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager

from fastkd.config import DataConfig
from pipelines.augment import CropRange, SizeSchedule, samples_per_rank
from pipelines.auto_augment import AutoAugment
from pipelines.base import BatchSpec, Loaders, Shard
from pipelines.batch_stage import BatchStage, Mixing, MixSpec, StagedLoader
from pipelines.datasets import Dataset, load_dataset
from pipelines.loaders import loader_workers


def crop_range(data: DataConfig) -> CropRange:
    """The training crops' area and aspect ranges (`data.crop_scale`, `data.crop_ratio`)."""
    return CropRange(tuple(data.crop_scale), tuple(data.crop_ratio))


def size_schedule(data: DataConfig) -> SizeSchedule:
    """The training image size per epoch (`data.image_size`, or its ramp)."""
    if data.start_image_size is None:
        return SizeSchedule(end=data.image_size)
    first, last = data.size_ramp_epochs
    return SizeSchedule(end=data.image_size, start=data.start_image_size, first=first, last=last,
                        step=data.image_size_step)


def dali_loader_values(cfg: DataConfig) -> dict[str, Any]:
    """What a `pipelines.dali_backend.DaliLoader` takes from the data section."""
    return dict(sizes=size_schedule(cfg), val_size=cfg.val_crop_size, val_resize=cfg.val_resize_size,
                crop_range=crop_range(cfg), prefetch_queue=cfg.dali_prefetch_queue)


def mix_spec(data: DataConfig) -> MixSpec:
    """mixup / CutMix as the data section sets them (`data.mixup_alpha`, ...)."""
    return MixSpec(mixup_alpha=data.mixup_alpha, cutmix_alpha=data.cutmix_alpha, prob=data.mix_prob,
                   switch_prob=data.mix_switch_prob, mode=data.mix_mode)


def batch_stage(data: DataConfig, *, seed: int, num_items: int) -> BatchStage | None:
    """The training batches' transforms on the device (`pipelines.batch_stage`), or None when
    the data section sets none (the backend's batches are then used as they come)."""
    transforms: list = []
    if data.auto_augment != "none":
        transforms.append(AutoAugment(data.auto_augment, seed=seed, num_items=num_items,
                                      num_ops=data.randaugment_num_ops, magnitude=data.randaugment_magnitude,
                                      num_bins=data.augment_magnitude_bins))
    if data.mixes:
        transforms.append(Mixing(mix_spec(data), seed=seed, num_items=num_items))
    return BatchStage(transforms) if transforms else None


def stage_description(data: DataConfig) -> list[dict[str, Any]]:
    """What a teacher cache records of the batch stage (empty without one)."""
    stage = batch_stage(data, seed=0, num_items=0)
    return stage.describe() if stage is not None else []


def load_data(cfg: DataConfig) -> Dataset:
    """The file lists of a real dataset (not for the synthetic backend)."""
    return load_dataset(cfg.format, cfg.root_path, train_list=cfg.train_list, val_list=cfg.val_list,
                        classes_file=cfg.classes_file, train_dir=cfg.train_dir, val_dir=cfg.val_dir)


def build_loaders(cfg: DataConfig, *, spec: BatchSpec, seed: int, shard: Shard = Shard(),
                  dataset: Dataset | None = None, teacher_image_size: int | None = None,
                  stage_guard: Callable[[], ContextManager] = contextlib.nullcontext) -> Loaders:
    """Training and validation loaders of the configured backend for this process, the
    training batches through the batch stage when the data section sets one (`batch_stage`),
    inside `stage_guard()` (the runtime's `no_host_sync`).

    With `teacher_image_size`, training batches come with a second view of the same crops at
    that size (`Batch.teacher_images`), for a teacher with its own input size.
    """
    synthetic = cfg.backend == "synthetic"
    if not synthetic:
        dataset = dataset or load_data(cfg)
    loaders = _backend_loaders(cfg, spec=spec, seed=seed, shard=shard, dataset=None if synthetic else dataset,
                               teacher_image_size=teacher_image_size)
    # The stage's draws by sample index: a synthetic batch's indices are its positions in the epoch.
    num_items = loaders.train.num_samples if synthetic else len(dataset.train)
    stage = batch_stage(cfg, seed=seed, num_items=num_items)
    if stage is not None:
        loaders.train = StagedLoader(loaders.train, stage, stage_guard)
    return loaders


def _backend_loaders(cfg: DataConfig, *, spec: BatchSpec, seed: int, shard: Shard, dataset: Dataset | None,
                     teacher_image_size: int | None) -> Loaders:
    val_batch_size = cfg.val_batch_size or cfg.batch_size
    sizes = size_schedule(cfg)
    deal = 2 if cfg.mixes else 1  # mixing pairs positions (2m, 2m + 1): each pair stays on one rank
    if cfg.backend == "synthetic":
        from pipelines.synthetic import SyntheticLoader

        classes = [f"class_{i:04d}" for i in range(cfg.synthetic_num_classes)]

        def synthetic(num_samples: int, batch_size: int, offset: int, sizes: SizeSchedule,
                      teacher_size: int | None, deal: int) -> SyntheticLoader:
            return SyntheticLoader(num_samples=samples_per_rank(num_samples, shard.world_size, deal),
                                   batch_size=batch_size, sizes=sizes, num_classes=len(classes),
                                   seed=seed + offset + 7919 * shard.rank, spec=spec, teacher_size=teacher_size)

        return Loaders(synthetic(cfg.synthetic_train_samples, cfg.batch_size, 0, sizes, teacher_image_size, deal),
                       synthetic(cfg.synthetic_val_samples, val_batch_size, 1, SizeSchedule(cfg.val_crop_size), None, 1),
                       classes)

    assert dataset is not None
    if cfg.backend == "torchvision":
        from pipelines.torchvision_backend import TorchvisionLoader

        common = dict(sizes=sizes, val_size=cfg.val_crop_size, val_resize=cfg.val_resize_size, seed=seed,
                      shard=shard, spec=spec, num_workers=loader_workers(cfg.num_workers, shard))
        return Loaders(TorchvisionLoader(dataset.train, train=True, batch_size=cfg.batch_size,
                                         teacher_size=teacher_image_size, crop_range=crop_range(cfg), deal=deal,
                                         **common),
                       TorchvisionLoader(dataset.val, train=False, batch_size=val_batch_size, **common),
                       list(dataset.classes))

    from pipelines.dali_backend import build_dali_loaders

    return build_dali_loaders(dataset, batch_size=cfg.batch_size, val_batch_size=val_batch_size, spec=spec, seed=seed,
                              shard=shard, teacher_image_size=teacher_image_size, deal=deal,
                              num_threads=max(1, loader_workers(cfg.num_workers, shard, dali=True)),
                              dali_device=cfg.dali_device, hw_decoder_load=cfg.dali_hw_decoder_load,
                              cpu_resize=cfg.dali_cpu_resize, **dali_loader_values(cfg))
