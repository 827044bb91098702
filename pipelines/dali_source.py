"""The training samples of a DALI pipeline, one per call, with their explicit augmentation.

DALI's parallel external source calls a `TrainSamples` object in Python worker processes, once
per sample, with the sample's place in the stream (`SampleInfo`: epoch and position). It
returns the file's path (UTF-8 bytes: DALI's `fn.io.file.read` reads the file in its own
threads) and one int64 row of numbers (`PARAMS`): the crop (anchor and shape, in pixels of the
EXIF-oriented image), the flip, the label and the sample's index: the same numbers the
torchvision backend uses (`pipelines.augment`), so both cut the same crops. One row rather
than one output per number: the pipeline's caller feeds every output of every sample to DALI
on the training thread. The image's size comes from its header, parsed once per worker. Light
on purpose (no torch): DALI starts its workers by forking or, once CUDA is initialized, by
spawning processes that import it.
"""

from __future__ import annotations

import multiprocessing
import threading
from typing import Any, Sequence

import numpy as np
from PIL import UnidentifiedImageError

from pipelines.worker_lifetime import die_with_parent
from pipelines.augment import batches_per_epoch, Crop, CropRange, SizeSchedule, epoch_order, oriented_size, samples_per_rank, train_crop

UNREADABLE = "fastkd: cannot read "
"""Starts the message of a file that cannot be read or whose header cannot be parsed."""
PADDING = -1
"""The index of a padding sample (a repeat that fills an epoch's last batch); dropped after DALI."""
PADDING_SIDE = 16
"""A padding sample's crop: its file's top-left 16x16 pixels, not a whole decode for nothing."""
PARAMS = ("left", "top", "width", "height", "flip", "label", "index", "size", "teacher_size")
"""The numbers of a sample, in the order of its params row (`size`: the epoch's scheduled side;
`teacher_size`: the side of the teacher's view, 0 without one)."""


class TrainSamples:
    """The pipeline's stream never ends: its sample `p` is position `p` of epoch after epoch,
    from `first_epoch` (shifted by `first_batch` batches, to resume mid-epoch) on, each epoch's
    last batch filled with padding samples (index `PADDING`), since DALI's sample mode has no
    partial batches (or left out, with `drop_last`). The loader takes `batches_in_epoch` batches per epoch from it; DALI never
    resets the pipeline between epochs, so its prefetching runs on across them (a reset would
    drain the queue, and each epoch's first batch would wait for a whole decode)."""

    def __init__(self, files: Sequence[str], labels: Sequence[int], *, seed: int, rank: int, world_size: int,
                 batch_size: int, sizes: SizeSchedule, teacher_size: int | None = None, first_epoch: int = 0,
                 first_batch: int = 0, crop_range: CropRange = CropRange(), deal: int = 1, drop_last: bool = False):
        self.files = list(files)
        self.drop_last = drop_last
        """Each epoch ends at its last full batch (`data.drop_last`): no padding is needed then."""
        self.crop_range = crop_range
        self.sizes = sizes
        self.teacher_size = teacher_size or 0
        self.labels = list(labels)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        self.first_epoch = first_epoch
        self.first_batch = first_batch
        self.deal = deal
        self.num_samples = samples_per_rank(len(self.files), world_size, deal)
        self._order: tuple[int, list[int]] | None = None
        self._sizes = np.full((len(self.files), 2), -1, dtype=np.int32)
        """Oriented (width, height) of each file once seen (a header is parsed once per worker;
        8 bytes per image: 10 MB for ImageNet)."""

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pickled_on_main_thread": threading.current_thread() is threading.main_thread()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled in a spawned DALI worker (a forked one is set up at the fork): the worker
        ends with the process that started it (`pipelines.worker_lifetime`)."""
        main_thread = state.pop("_pickled_on_main_thread", False)
        self.__dict__.update(state)
        parent = multiprocessing.parent_process()
        if parent is not None and parent.pid is not None:
            die_with_parent(parent.pid, parent_thread_lives=main_thread)

    def order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.files), seed=self.seed, epoch=epoch, shuffle=True,
                                              rank=self.rank, world_size=self.world_size, deal=self.deal))
        return self._order[1]

    def batches_in_epoch(self, epoch: int) -> int:
        """How many batches of the stream belong to `epoch` (the first one from `first_batch` on)."""
        start = self.first_batch if epoch == self.first_epoch else 0
        return max(0, batches_per_epoch(self.num_samples, self.batch_size, self.drop_last) - start)

    def locate(self, position: int) -> tuple[int, int]:
        """(epoch, position in the epoch's order) of the stream's sample `position`: a padding
        sample when past the order's end."""
        epoch, skipped = self.first_epoch, self.first_batch * self.batch_size
        first_epoch_samples = self.batches_in_epoch(epoch) * self.batch_size
        if position >= first_epoch_samples:
            later, position = divmod(position - first_epoch_samples, self.batches_in_epoch(epoch + 1) * self.batch_size)
            epoch, skipped = epoch + 1 + later, 0
        return epoch, skipped + position

    def __call__(self, sample_info: Any) -> tuple[np.ndarray, np.ndarray]:
        # DALI's epoch stays 0: the source never raises StopIteration.
        epoch, position = self.locate(sample_info.idx_in_epoch)
        order = self.order(epoch)
        index = order[min(position, len(order) - 1)]
        path = self.files[index]
        if self._sizes[index, 0] < 0:
            try:
                self._sizes[index] = oriented_size(path)
            except Exception as exc:  # named here: DALI would report only its worker's traceback
                reason = "not an image, or an unsupported format" if isinstance(exc, UnidentifiedImageError) else exc
                raise ValueError(f"{UNREADABLE}{path}: {reason}") from None
        width, height = (int(v) for v in self._sizes[index])
        padding = position >= len(order)
        if padding:  # dropped after DALI: libjpeg-turbo (CPU) decodes a baseline JPEG's corner from its first rows
            crop = Crop(0, 0, min(height, PADDING_SIDE), min(width, PADDING_SIDE), False)
        else:
            crop = train_crop(self.seed, epoch, index, width, height, self.crop_range)
        params = (crop.left, crop.top, crop.width, crop.height, int(crop.flip), self.labels[index],
                  PADDING if padding else index, self.sizes.at(epoch), self.teacher_size)
        return np.frombuffer(path.encode(), dtype=np.uint8), np.array(params, dtype=np.int64)
