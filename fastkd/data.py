"""The data section of a config turned into a backend's loaders: the one place where
`DataConfig` meets `pipelines/`, which takes explicit values only."""

from __future__ import annotations

from typing import Any

from fastkd.config import DataConfig
from pipelines.augment import CropRange, SizeSchedule, samples_per_rank
from pipelines.base import BatchSpec, Loaders, Shard
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


def load_data(cfg: DataConfig) -> Dataset:
    """The file lists of a real dataset (not for the synthetic backend)."""
    return load_dataset(cfg.format, cfg.root_path, train_list=cfg.train_list, val_list=cfg.val_list,
                        classes_file=cfg.classes_file, train_dir=cfg.train_dir, val_dir=cfg.val_dir)


def build_loaders(cfg: DataConfig, *, spec: BatchSpec, seed: int, shard: Shard = Shard(),
                  dataset: Dataset | None = None, teacher_image_size: int | None = None) -> Loaders:
    """Training and validation loaders of the configured backend for this process.

    With `teacher_image_size`, training batches come with a second view of the same crops at
    that size (`indexed()`'s fourth item), for a teacher with its own input size.
    """
    val_batch_size = cfg.val_batch_size or cfg.batch_size
    sizes = size_schedule(cfg)
    if cfg.backend == "synthetic":
        from pipelines.synthetic import SyntheticLoader

        classes = [f"class_{i:04d}" for i in range(cfg.synthetic_num_classes)]

        def synthetic(num_samples: int, batch_size: int, offset: int, sizes: SizeSchedule,
                      teacher_size: int | None) -> SyntheticLoader:
            return SyntheticLoader(num_samples=samples_per_rank(num_samples, shard.world_size), batch_size=batch_size,
                                   sizes=sizes, num_classes=len(classes), seed=seed + offset + 7919 * shard.rank,
                                   spec=spec, teacher_size=teacher_size)

        return Loaders(synthetic(cfg.synthetic_train_samples, cfg.batch_size, 0, sizes, teacher_image_size),
                       synthetic(cfg.synthetic_val_samples, val_batch_size, 1, SizeSchedule(cfg.val_crop_size), None),
                       classes)

    dataset = dataset or load_data(cfg)
    if cfg.backend == "torchvision":
        from pipelines.torchvision_backend import TorchvisionLoader

        common = dict(sizes=sizes, val_size=cfg.val_crop_size, val_resize=cfg.val_resize_size, seed=seed,
                      shard=shard, spec=spec, num_workers=loader_workers(cfg.num_workers, shard))
        return Loaders(TorchvisionLoader(dataset.train, train=True, batch_size=cfg.batch_size,
                                         teacher_size=teacher_image_size, crop_range=crop_range(cfg), **common),
                       TorchvisionLoader(dataset.val, train=False, batch_size=val_batch_size, **common),
                       list(dataset.classes))

    from pipelines.dali_backend import build_dali_loaders

    return build_dali_loaders(dataset, batch_size=cfg.batch_size, val_batch_size=val_batch_size, spec=spec, seed=seed,
                              shard=shard, teacher_image_size=teacher_image_size,
                              num_threads=max(1, loader_workers(cfg.num_workers, shard, dali=True)),
                              dali_device=cfg.dali_device, hw_decoder_load=cfg.dali_hw_decoder_load,
                              cpu_resize=cfg.dali_cpu_resize, **dali_loader_values(cfg))
