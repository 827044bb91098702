"""Synthetic batches already on the device: the throughput ceiling of the model itself.

A few random batches are made once and cycled, so the loader costs nothing per step.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch

from pipelines.base import BatchSpec

_POOL_BATCHES = 4


class SyntheticLoader:
    def __init__(self, *, num_samples: int, batch_size: int, image_size: int, num_classes: int,
                 seed: int, spec: BatchSpec):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.spec = spec
        generator = torch.Generator().manual_seed(seed)
        shape = (batch_size, 3, image_size, image_size)
        self._images = [
            torch.randn(shape, generator=generator).clamp_(-2.0, 2.0)
            .to(spec.device, spec.dtype).contiguous(memory_format=spec.memory_format)
            for _ in range(_POOL_BATCHES)
        ]
        self._labels = [torch.randint(num_classes, (batch_size,), generator=generator).to(spec.device)
                        for _ in range(_POOL_BATCHES)]
        self._start_batch = 0

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self._start_batch = start_batch

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def indexed(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Batches with their sample indices (positions in the epoch; the pool repeats them)."""
        for batch in range(self._start_batch, len(self)):
            first = batch * self.batch_size
            size = min(self.batch_size, self.num_samples - first)
            slot = batch % _POOL_BATCHES
            yield self._images[slot][:size], self._labels[slot][:size], torch.arange(first, first + size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, _ in self.indexed():
            yield images, labels
