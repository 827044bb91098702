"""Synthetic batches already on the device: the throughput ceiling of the model itself.

A few random batches are made once and cycled, so the loader costs nothing per step.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from pipelines.augment import SizeSchedule, batches_per_epoch
from pipelines.base import Batch, BatchSpec

_POOL_BATCHES = 4


class SyntheticBatches:
    """A host stage whose batches are made on the device (no device stage follows it): batches of
    the scheduled size (`sizes`), and of the teacher's size when it has its own."""

    def __init__(self, *, num_samples: int, batch_size: int, sizes: SizeSchedule, num_classes: int,
                 seed: int, spec: BatchSpec, teacher_size: int | None = None, drop_last: bool = False):
        self.num_samples = num_samples
        self.drop_last = drop_last
        self.batch_size = batch_size
        self.spec = spec
        self.sizes = sizes
        self.teacher_size = teacher_size
        self._seed = seed
        generator = torch.Generator().manual_seed(seed)
        self._labels = [torch.randint(num_classes, (batch_size,), generator=generator).to(spec.device)
                        for _ in range(_POOL_BATCHES)]
        self._pools: dict[int, list[torch.Tensor]] = {}
        self._epoch = 0
        self._start_batch = 0
        self.prefetched_batches = 0

    def _images(self, size: int) -> list[torch.Tensor]:
        if size not in self._pools:
            generator = torch.Generator().manual_seed(self._seed * 7919 + size)
            shape = (self.batch_size, 3, size, size)
            self._pools[size] = [
                torch.randn(shape, generator=generator).clamp_(-2.0, 2.0)
                .to(self.spec.device, self.spec.dtype).contiguous(memory_format=self.spec.memory_format)
                for _ in range(_POOL_BATCHES)
            ]
        return self._pools[size]

    def __len__(self) -> int:
        return batches_per_epoch(self.num_samples, self.batch_size, self.drop_last)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self._epoch, self._start_batch = epoch, start_batch

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __iter__(self) -> Iterator[Batch]:
        """Batches with their sample indices (positions in the epoch; the pool repeats them)."""
        images = self._images(self.sizes.at(self._epoch))
        teacher = self._images(self.teacher_size) if self.teacher_size else None
        for batch in range(self._start_batch, len(self)):
            first = batch * self.batch_size
            size = min(self.batch_size, self.num_samples - first)
            slot = batch % _POOL_BATCHES
            yield Batch(images[slot][:size], self._labels[slot][:size], torch.arange(first, first + size),
                        None if teacher is None else teacher[slot][:size])
