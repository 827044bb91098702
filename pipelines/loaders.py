"""Building a backend's loaders from a data config (re-exported by `pipelines`)."""

from __future__ import annotations

from fastkd.config import DataConfig
from fastkd.env import cpu_count
from pipelines.augment import SizeSchedule, crop_range, size_schedule
from pipelines.base import BatchSpec, Loaders, Shard
from pipelines.datasets import Dataset, load_dataset

# DALI threads per process unless data.num_workers says otherwise: beyond this a pipeline stops
# gaining, while each thread holds its own decoder buffers (host and, for nvJPEG, device memory).
MAX_DEFAULT_DALI_THREADS = 8


def loader_workers(num_workers: int | None, shard: Shard, *, dali: bool = False) -> int:
    """DataLoader workers or DALI threads of one process: `num_workers`, or this process's share
    of the node's cores (the node's processes split them), at most 8 DALI threads."""
    if num_workers is not None:
        return num_workers
    share = max(1, cpu_count() // max(1, shard.local_world_size))
    return min(share, MAX_DEFAULT_DALI_THREADS) if dali else share


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
            per_rank = -(-num_samples // shard.world_size)
            return SyntheticLoader(num_samples=per_rank, batch_size=batch_size, sizes=sizes, num_classes=len(classes),
                                   seed=seed + offset + 7919 * shard.rank, spec=spec, teacher_size=teacher_size)

        return Loaders(synthetic(cfg.synthetic_train_samples, cfg.batch_size, 0, sizes, teacher_image_size),
                       synthetic(cfg.synthetic_val_samples, val_batch_size, 1, SizeSchedule(cfg.val_crop_size), None),
                       classes)

    dataset = dataset or load_data(cfg)
    if cfg.backend == "torchvision":
        workers = loader_workers(cfg.num_workers, shard)
        from pipelines.torchvision_backend import TorchvisionLoader

        common = dict(sizes=sizes, val_size=cfg.val_crop_size, val_resize=cfg.val_resize_size, num_workers=workers,
                      seed=seed, shard=shard, spec=spec)
        return Loaders(TorchvisionLoader(dataset.train, train=True, batch_size=cfg.batch_size,
                                         teacher_size=teacher_image_size, crop_range=crop_range(cfg), **common),
                       TorchvisionLoader(dataset.val, train=False, batch_size=val_batch_size, **common),
                       list(dataset.classes))

    from pipelines.dali_backend import build_dali_loaders

    threads = max(1, loader_workers(cfg.num_workers, shard, dali=True))
    return build_dali_loaders(cfg, dataset, spec=spec, seed=seed, shard=shard, num_threads=threads,
                              val_batch_size=val_batch_size, teacher_image_size=teacher_image_size)
