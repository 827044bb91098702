"""Data pipelines: every backend yields batches per the contract in `pipelines.base`."""

from __future__ import annotations

import os

from fastkd.config import DataConfig
from pipelines.base import BatchSpec, Loader, Loaders, Shard
from pipelines.datasets import Dataset, load_dataset

__all__ = ["BatchSpec", "Loader", "Loaders", "Shard", "build_loaders", "load_data", "available_cpus"]


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def load_data(cfg: DataConfig) -> Dataset:
    """The file lists of a real dataset (not for the synthetic backend)."""
    return load_dataset(cfg.format, cfg.root_path, train_list=cfg.train_list, val_list=cfg.val_list,
                        classes_file=cfg.classes_file)


def build_loaders(cfg: DataConfig, *, spec: BatchSpec, seed: int, shard: Shard = Shard(),
                  dataset: Dataset | None = None) -> Loaders:
    """Training and validation loaders of the configured backend for this process."""
    val_batch_size = cfg.val_batch_size or cfg.batch_size
    if cfg.backend == "synthetic":
        from pipelines.synthetic import SyntheticLoader

        classes = [f"class_{i:04d}" for i in range(cfg.synthetic_num_classes)]

        def synthetic(num_samples: int, batch_size: int, offset: int) -> SyntheticLoader:
            per_rank = -(-num_samples // shard.world_size)
            return SyntheticLoader(num_samples=per_rank, batch_size=batch_size, image_size=cfg.image_size,
                                   num_classes=len(classes), seed=seed + offset + 7919 * shard.rank, spec=spec)

        return Loaders(synthetic(cfg.synthetic_train_samples, cfg.batch_size, 0),
                       synthetic(cfg.synthetic_val_samples, val_batch_size, 1), classes)

    dataset = dataset or load_data(cfg)
    workers = available_cpus() if cfg.num_workers is None else cfg.num_workers
    if cfg.backend == "torchvision":
        from pipelines.torchvision_backend import TorchvisionLoader

        common = dict(image_size=cfg.image_size, val_resize=cfg.val_resize, num_workers=workers,
                      seed=seed, shard=shard, spec=spec)
        return Loaders(TorchvisionLoader(dataset.train, train=True, batch_size=cfg.batch_size, **common),
                       TorchvisionLoader(dataset.val, train=False, batch_size=val_batch_size, **common),
                       list(dataset.classes))

    from pipelines.dali_backend import build_dali_loaders

    return build_dali_loaders(cfg, dataset, spec=spec, seed=seed, shard=shard, num_threads=max(1, workers),
                              val_batch_size=val_batch_size)
