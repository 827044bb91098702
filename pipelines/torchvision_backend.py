"""The torchvision DataLoader baseline: PIL decoding in worker processes, uint8 batches
normalized on the device.

Augmentation matches the DALI pipeline and the original project: RandomResizedCrop
(area 0.08-1, aspect 3/4-4/3 unless `data.crop_scale`/`crop_ratio` say otherwise) + horizontal flip for training; resize of the shorter side to
`val_resize` + centre crop for validation. The random draws come from a per-sample generator
seeded by (seed, epoch, sample index) rather than the worker's global RNG, so the augmented
stream is the same for any number of workers and can be resumed at any batch.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import signal
from typing import Any, Iterator

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps

from fastkd.errors import DataError
from pipelines.augment import (CropRange, SizeSchedule, batches_per_epoch, check_stream_state, epoch_order,
                               stream_state, train_crop)
from pipelines.base import Batch, BatchSpec, Loader, Shard, needs_pinned_memory, normalization
from pipelines.datasets import Dataset, Split
from pipelines.verify import unlimited_pixels

BROKEN_HINT = " (list every undecodable file with `fastkd data verify ROOT`)"
PREFETCH_FACTOR = 4  # batches each DataLoader worker prepares ahead


def decode_rgb(path: str) -> Image.Image:
    """Decode any PIL-readable image to RGB, applying its EXIF orientation like DALI does
    (whatever its size: `fastkd data verify` passes huge images, so training decodes them too)."""
    with unlimited_pixels(), Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")


def _pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))


class ImageListDataset(torch.utils.data.Dataset):
    """Items are `(sample index, epoch)` pairs; returns HWC uint8, the label and the index (and,
    with a `teacher_size`, the same crop resized for the teacher)."""

    def __init__(self, split: Split, *, train: bool, sizes: SizeSchedule, val_size: int, val_resize: int, seed: int,
                 teacher_size: int | None = None, crop_range: CropRange = CropRange()):
        self.files = split.files
        self.crop_range = crop_range
        self.labels = split.labels
        self.train = train
        self.sizes = sizes
        self.val_size = val_size
        self.val_resize = val_resize
        self.seed = seed
        self.teacher_size = teacher_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]) -> tuple:
        index, epoch = item
        try:
            image = decode_rgb(self.files[index])
        except Exception as exc:  # any decoder failure: name the file, not the worker's traceback
            raise DataError(f"cannot decode {self.files[index]}: {exc}") from None
        if not self.train:
            size = [self.val_size, self.val_size]
            return _pixels(TF.center_crop(TF.resize(image, self.val_resize, antialias=True), size)), self.labels[index], index
        crop = train_crop(self.seed, epoch, index, image.width, image.height, self.crop_range)
        views = []
        for side in (self.sizes.at(epoch), self.teacher_size):  # the student's, then the teacher's
            if side is None:
                continue
            view = TF.resized_crop(image, crop.top, crop.left, crop.height, crop.width, [side, side], antialias=True)
            views.append(_pixels(TF.hflip(view) if crop.flip else view))
        return views[0], self.labels[index], index, *views[1:]


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGTERM/SIGINT to the main process, which finishes its step, checkpoints and
    then shuts them down; otherwise Ctrl-C, torchrun or a scheduler signalling the whole process
    group would kill them mid-step and crash the main process."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


_OUR_WORKERS: list = []
"""Every DataLoader worker process a TorchvisionLoader started (and only those)."""


def _kill_workers_at_exit() -> None:
    """At interpreter exit multiprocessing stops daemonic children with SIGTERM and waits for
    them; our workers ignore SIGTERM (see `_ignore_stop_signals`), so stop those still running
    with SIGKILL first (they are idle by then). Processes fastkd did not start are not touched."""
    alive = [worker for worker in _OUR_WORKERS if worker.is_alive()]
    if not alive:
        return
    # The DataLoader's SIGCHLD handler would report these kills as worker failures, raising in
    # the middle of this hook; the process is exiting, so the default disposition is right.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in alive:
        worker.kill()
    for worker in alive:
        worker.join(timeout=5)


@functools.cache
def _register_exit_hook() -> None:
    # Registered after multiprocessing's own exit hook, so it runs before it (LIFO).
    atexit.register(_kill_workers_at_exit)


def _start_iterating(loader: torch.utils.data.DataLoader) -> Iterator:
    """`iter(loader)`, remembering the worker processes it starts (the first call of a loader
    with persistent workers) in `_OUR_WORKERS`: the children that `multiprocessing` lists after
    the call and not before (the main thread starts no other process meanwhile)."""
    before = set(multiprocessing.active_children())
    iterator = iter(loader)
    started = [child for child in multiprocessing.active_children() if child not in before]
    if started:
        _register_exit_hook()
        _OUR_WORKERS.extend(started)
    return iterator


class EpochSampler(torch.utils.data.Sampler):
    """One rank's `(index, epoch)` items for one epoch (`pipelines.augment.epoch_order`), from a
    given batch on."""

    def __init__(self, num_items: int, *, shuffle: bool, seed: int, shard: Shard, batch_size: int, deal: int = 1,
                 drop_last: bool = False):
        self.num_items = num_items
        self.deal = deal
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.seed = seed
        self.shard = shard
        self.batch_size = batch_size
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def order(self) -> list[int]:
        """The sample indices dealt to this rank for the current epoch, in order."""
        return epoch_order(self.num_items, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle,
                           rank=self.shard.rank, world_size=self.shard.world_size, deal=self.deal)

    def indices(self) -> list[int]:
        """Those of them its batches hold (the partial last batch's left out with `drop_last`)."""
        order = self.order()
        return order[:batches_per_epoch(len(order), self.batch_size, self.drop_last) * self.batch_size]

    def __len__(self) -> int:
        return max(0, len(self.indices()) - self.start_batch * self.batch_size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self.indices()[self.start_batch * self.batch_size:]:
            yield index, self.epoch


class TorchvisionBatches:
    """The host stage of the torchvision backend (`pipelines.base.HostStage`): a DataLoader over an
    image list, decoding and augmenting in worker processes into uint8 NHWC batches in (pinned)
    host memory, with their labels, sample indices and the teacher's view of the same crops
    (None without one). `ToDevice` is the stage after it."""

    def __init__(self, split: Split, *, train: bool, batch_size: int, sizes: SizeSchedule, val_size: int,
                 val_resize: int, num_workers: int, seed: int, shard: Shard, pin_memory: bool,
                 teacher_size: int | None = None, crop_range: CropRange = CropRange(), deal: int = 1,
                 drop_last: bool = False):
        self.batch_size = batch_size
        self.sampler = EpochSampler(len(split), shuffle=train, seed=seed, shard=shard, batch_size=batch_size,
                                    deal=deal if train else 1, drop_last=drop_last and train)
        self.num_samples = len(self.sampler.order())
        self.prefetched_batches = num_workers * PREFETCH_FACTOR
        """Batches the workers hold ready at most (a benchmark must drain them before timing)."""
        dataset = ImageListDataset(split, train=train, sizes=sizes, val_size=val_size, val_resize=val_resize, seed=seed,
                                   teacher_size=teacher_size if train else None, crop_range=crop_range)
        self._loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers,
            pin_memory=pin_memory, drop_last=False,
            persistent_workers=num_workers > 0, prefetch_factor=PREFETCH_FACTOR if num_workers > 0 else None,
            worker_init_fn=_ignore_stop_signals,
            # Its own generator: drawing worker seeds must not consume the global RNG (exact resume).
            generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return batches_per_epoch(self.num_samples, self.batch_size, self.sampler.drop_last)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    def state_dict(self) -> dict[str, Any]:
        return stream_state() if self.sampler.shuffle else {}  # a pure function of (seed, epoch, batch)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.sampler.shuffle:
            check_stream_state(state)

    def __iter__(self) -> Iterator[Batch]:
        try:
            batches = _start_iterating(self._loader)
            for pixels, labels, indices, *teacher in batches:
                yield Batch(pixels, labels, indices, teacher[0] if teacher else None)
        except DataError as exc:  # re-raised from a worker with its traceback: keep the last line
            message = str(exc).strip().splitlines()[-1]
            raise DataError(message.split("DataError: ", 1)[-1] + BROKEN_HINT) from None


class ToDevice:
    """The device stage after `TorchvisionBatches`: uint8 NHWC pixels (pinned on a GPU run) copied
    to the device without blocking and normalized there into the contract's channels-last batch;
    labels copied alike (indices stay on the host)."""

    name = "host-to-device copy"

    def __init__(self, spec: BatchSpec):
        self.spec = spec
        self._mean, self._inv_std = normalization(spec.device, spec.dtype)  # once, not per batch

    def set_epoch(self, epoch: int) -> None:
        pass

    def _images(self, pixels: torch.Tensor) -> torch.Tensor:
        # NHWC uint8 -> NCHW view with channels-last strides; the normalization keeps them.
        images = pixels.to(self.spec.device, non_blocking=True).permute(0, 3, 1, 2).to(self.spec.dtype)
        images = images.sub_(self._mean).mul_(self._inv_std)
        return images.contiguous(memory_format=self.spec.memory_format)

    def __call__(self, batch: Batch) -> Batch:
        teacher = batch.teacher_images
        return Batch(self._images(batch.images), batch.labels.to(self.spec.device, non_blocking=True),
                     batch.indices, None if teacher is None else self._images(teacher))


def torchvision_loaders(dataset: Dataset, *, spec: BatchSpec, batch_size: int, val_batch_size: int, **values: Any
                        ) -> tuple[Loader, Loader]:
    """Training and validation loaders of the torchvision backend (`values`: `TorchvisionBatches`'
    other arguments; `teacher_size`, `crop_range`, `deal` and `drop_last` for training only)."""
    pin = needs_pinned_memory(spec.device)  # the DataLoader's pinning thread stages them for ToDevice
    training = {key: values.pop(key) for key in ("teacher_size", "crop_range", "deal", "drop_last") if key in values}
    to_device = ToDevice(spec)
    return (Loader(TorchvisionBatches(dataset.train, train=True, batch_size=batch_size, pin_memory=pin, **training,
                                      **values), [to_device]),
            Loader(TorchvisionBatches(dataset.val, train=False, batch_size=val_batch_size, pin_memory=pin, **values),
                   [to_device]))
