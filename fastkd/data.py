"""The data section of a config turned into a run's checked dataset and its loaders: the one
place where `DataConfig` meets `pipelines/`, which takes explicit values only.

A loader is its backend's host stage, then its device stages in order
(`pipelines.base.Loader`): the backend's copy to the device, then the batch stage's transforms
the data section sets (RandAugment or TrivialAugmentWide, then mixup/CutMix).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager

from fastkd.config import DaliConfig, DataConfig
from fastkd.distributed import barrier
from fastkd.errors import ConfigError, DataError
from fastkd.log import log
from pipelines.augment import CropRange, SizeSchedule, samples_per_rank
from pipelines.auto_augment import AutoAugment
from pipelines.base import BatchSpec, Loader, Loaders, Shard
from pipelines.batch_stage import BatchTransform, Mixing, MixSpec
from pipelines.datasets import Dataset, load_dataset
from pipelines.loaders import loader_workers
from pipelines.verify import find_broken_images


def crop_range(data: DataConfig) -> CropRange:
    """The training crops' area and aspect ranges (`data.crop_scale`, `data.crop_ratio`)."""
    return CropRange(data.crop_scale, data.crop_ratio)


def size_schedule(data: DataConfig) -> SizeSchedule:
    """The training image size per epoch (`data.image_size`, or `data.size_schedule`'s ramp)."""
    schedule = data.size_schedule
    if schedule is None:
        return SizeSchedule(end=data.image_size)
    first, last = schedule.ramp_epochs
    return SizeSchedule(end=data.image_size, start=schedule.start_image_size, first=first, last=last,
                        step=schedule.image_size_step)


def dali_loader_values(cfg: DataConfig) -> dict[str, Any]:
    """What a `pipelines.dali_backend.DaliBatches` takes from the data section."""
    dali = cfg.dali or DaliConfig()
    return dict(sizes=size_schedule(cfg), val_size=cfg.val_crop_size, val_resize=cfg.val_resize_size,
                crop_range=crop_range(cfg), prefetch_queue=dali.prefetch_queue)


def mix_spec(data: DataConfig) -> MixSpec:
    """mixup / CutMix as `data.mix` sets them."""
    mix = data.mix
    assert mix is not None, "no data.mix section"
    return MixSpec(mixup_alpha=mix.mixup_alpha, cutmix_alpha=mix.cutmix_alpha, prob=mix.prob,
                   switch_prob=mix.switch_prob, mode=mix.mode)


def batch_transforms(data: DataConfig, *, seed: int, num_items: int) -> list[BatchTransform]:
    """The batch stage's transforms the data section sets, in order (empty: none)."""
    transforms: list[BatchTransform] = []
    if data.randaugment is not None:
        ra = data.randaugment
        transforms.append(AutoAugment("randaugment", seed=seed, num_items=num_items, num_ops=ra.num_ops,
                                      magnitude=ra.magnitude, num_bins=ra.magnitude_bins))
    if data.trivialaugment is not None:
        transforms.append(AutoAugment("trivialaugment", seed=seed, num_items=num_items,
                                      num_bins=data.trivialaugment.magnitude_bins))
    if data.mix is not None:
        transforms.append(Mixing(mix_spec(data), seed=seed, num_items=num_items))
    return transforms


def stage_description(data: DataConfig) -> list[dict[str, Any]]:
    """What a teacher cache records of the batch stage (empty without one)."""
    return [transform.describe() for transform in batch_transforms(data, seed=0, num_items=0)]


def load_data(cfg: DataConfig) -> Dataset:
    """The file lists of a real dataset (not for the synthetic backend)."""
    return load_dataset(cfg.format, cfg.root_path, train_list=cfg.train_list, val_list=cfg.val_list,
                        classes_file=cfg.classes_file, train_dir=cfg.train_dir, val_dir=cfg.val_dir)


def checked_dataset(cfg: DataConfig, shard: Shard, *, is_main: bool, splits: tuple[str, ...] = ("train", "val")
                    ) -> Dataset | None:
    """The run's file lists (the demo's images made first if `data.generate_demo`), with the
    undecodable images of `splits` refused (or dropped with data.skip_broken); None with synthetic
    data. Collective under torchrun: rank 0 makes and decodes first, the others then read its cache."""
    if cfg.generate_demo:
        if is_main:
            from fastkd.synth import ensure_demo_dataset

            ensure_demo_dataset(cfg.root_path)
        barrier()
    if cfg.backend == "synthetic":
        return None
    dataset = load_data(cfg)
    if not cfg.verify_images:
        return dataset
    files = [path for split in splits for path in getattr(dataset, split).files]
    workers = max(1, loader_workers(cfg.num_workers, shard))
    broken = []
    for turn in (True, False):  # rank 0 decodes and caches; the others then read the cache
        if is_main == turn:
            broken = find_broken_images(files, root=cfg.root_path, workers=workers, progress=is_main)
        barrier()
    if not broken:
        return dataset
    first = broken[0]
    if not cfg.skip_broken:
        more = f" and {len(broken) - 1} more" if len(broken) > 1 else ""
        raise DataError(f"cannot decode {first.path} ({first.reason}){more}; list them with `fastkd data verify "
                        f"{cfg.root}`, or set data.skip_broken: true to train without them")
    if is_main:
        log.warning(f"warning: training without {len(broken)} image(s) that cannot be decoded:")
        for item in broken:
            log.warning(f"  {item.path}: {item.reason}")
    drop = {item.path for item in broken}
    return Dataset(dataset.classes, dataset.train.without(drop), dataset.val.without(drop))


def build_loaders(cfg: DataConfig, *, spec: BatchSpec, seed: int, shard: Shard = Shard(),
                  dataset: Dataset | None = None, teacher_image_size: int | None = None,
                  stage_guard: Callable[[], ContextManager] = contextlib.nullcontext) -> Loaders:
    """Training and validation loaders of the configured backend for this process: the backend's
    host stage and copy to the device, then, for training, the batch stage's transforms
    (`batch_transforms`); the training loader's device stages run inside `stage_guard()` (the
    runtime's `no_host_sync`).

    With `teacher_image_size`, training batches come with a second view of the same crops at
    that size (`Batch.teacher_images`), for a teacher with its own input size.
    """
    if cfg.backend == "synthetic":
        dataset = None
    else:
        dataset = dataset or load_data(cfg)
    loaders = _backend_loaders(cfg, spec=spec, seed=seed, shard=shard, dataset=dataset,
                               teacher_image_size=teacher_image_size)
    if len(loaders.train) == 0:
        dealt = len(dataset.train) if dataset is not None else (cfg.synthetic.train_samples if cfg.synthetic else 0)
        raise ConfigError(f"data.drop_last: {dealt} training image(s) over {shard.world_size} process(es) make no "
                          f"full batch of data.batch_size {cfg.batch_size}: lower the batch size, or set "
                          "data.drop_last: false")
    # The stage's draws by sample index: a synthetic batch's indices are its positions in the epoch.
    num_items = loaders.train.num_samples if dataset is None else len(dataset.train)
    train = loaders.train
    loaders.train = Loader(train.host, [*train.stages, *batch_transforms(cfg, seed=seed, num_items=num_items)],
                           guard=stage_guard)
    return loaders


def _backend_loaders(cfg: DataConfig, *, spec: BatchSpec, seed: int, shard: Shard, dataset: Dataset | None,
                     teacher_image_size: int | None) -> Loaders:
    val_batch_size = cfg.val_batch_size or cfg.batch_size
    sizes = size_schedule(cfg)
    deal = 2 if cfg.mixes else 1  # mixing pairs positions (2m, 2m + 1): each pair stays on one rank
    if cfg.backend == "synthetic":
        from pipelines.synthetic import SyntheticBatches

        synth = cfg.synthetic
        assert synth is not None  # resolved by DataConfig
        classes = [f"class_{i:04d}" for i in range(synth.num_classes)]

        def synthetic(num_samples: int, batch_size: int, offset: int, sizes: SizeSchedule,
                      teacher_size: int | None, deal: int, drop_last: bool) -> Loader:
            return Loader(SyntheticBatches(num_samples=samples_per_rank(num_samples, shard.world_size, deal),
                                           batch_size=batch_size, sizes=sizes, num_classes=len(classes),
                                           seed=seed + offset + 7919 * shard.rank, spec=spec, teacher_size=teacher_size,
                                           drop_last=drop_last))

        return Loaders(synthetic(synth.train_samples, cfg.batch_size, 0, sizes, teacher_image_size, deal, cfg.drop_last),
                       synthetic(synth.val_samples, val_batch_size, 1, SizeSchedule(cfg.val_crop_size), None, 1, False),
                       classes)

    assert dataset is not None
    if cfg.backend == "torchvision":
        from pipelines.torchvision_backend import torchvision_loaders

        train, val = torchvision_loaders(
            dataset, spec=spec, batch_size=cfg.batch_size, val_batch_size=val_batch_size, sizes=sizes,
            val_size=cfg.val_crop_size, val_resize=cfg.val_resize_size, seed=seed, shard=shard,
            num_workers=loader_workers(cfg.num_workers, shard), teacher_size=teacher_image_size,
            crop_range=crop_range(cfg), deal=deal, drop_last=cfg.drop_last)
        return Loaders(train, val, list(dataset.classes))

    from pipelines.dali_backend import build_dali_loaders

    dali = cfg.dali or DaliConfig()
    return build_dali_loaders(dataset, batch_size=cfg.batch_size, val_batch_size=val_batch_size, spec=spec, seed=seed,
                              shard=shard, teacher_image_size=teacher_image_size, deal=deal, drop_last=cfg.drop_last,
                              num_threads=max(1, loader_workers(cfg.num_workers, shard, dali=True)),
                              dali_device=dali.device, hw_decoder_load=dali.hw_decoder_load,
                              cpu_resize=dali.cpu_resize, **dali_loader_values(cfg))
