"""The batch contract every data backend honours, written once.

A training or validation loader yields `(images, labels)`:

- `images`: `[B, 3, H, W]` floating tensor on the training device, channels-last memory,
  normalized with the ImageNet mean/std (values roughly within [-2.2, 2.7]); float32 on the
  CPU or with fp32 precision, float16 on a GPU with reduced precision (autocast takes it on).
- `labels`: int64 `[B]` on the same device, values in `[0, num_classes)`.
- `len(loader)` is the number of batches of one epoch on this process (partial last batch
  included); `loader.num_samples` the number of images this process sees per epoch.

Training loaders also yield, through `indexed()`, a `Batch`: the images and labels above, each
sample's index in the split (int64 `[B]`, on the host), which a teacher cache is keyed by, the
teacher's view of the same crops at its own input size (or None), and the batch's `Mix` (or
None) once the batch stage (`pipelines.batch_stage`) has mixed it.

The loop never branches on the backend: it only relies on this contract and on
`set_epoch(epoch, start_batch)` / `state_dict()` / `load_state_dict()` for exact resume.
Every training loader also exposes the two stages of `indexed()`, `host_batches()` (a `Batch`
as the backend makes it) and `to_device(batch)`, and `prefetched_batches`, which `fastkd bench`
times and drains (a loader whose batches are made on the device has an identity second stage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Loader(Protocol):
    num_samples: int
    batch_size: int
    prefetched_batches: int
    """Batches the loader can hold ready before one is asked for (its workers' queues): what a
    benchmark's warm-up must drain so as to time the loader, not a queue."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def indexed(self) -> Iterator["Batch"]:
        """Training batches with their samples' indices (host int64 `[B]`): `to_device(b)` of
        every `b` of `host_batches()`."""

    def host_batches(self) -> Iterator["Batch"]:
        """Stage 1 of `indexed()`: batches as the backend makes them (host memory, HWC, for a
        CPU decoder), before `to_device`."""

    def to_device(self, batch: "Batch") -> "Batch":
        """Stage 2: a `host_batches()` batch as the contract above has it."""

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Prepare the next `iter()` to yield epoch `epoch` from batch `start_batch` on."""

    def state_dict(self) -> dict[str, Any]:
        """What, beyond (epoch, batch), is needed to resume the stream exactly."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Mix:
    """How a batch's samples were mixed with their partners (mixup or CutMix): the targets.

    Sample k's target is `weight[k] * onehot(labels[k]) + (1 - weight[k]) * onehot(partner_labels[k])`
    (label smoothing applied to both), `weight` being the share of its own image in its mix."""

    weight: torch.Tensor
    """fp32 `[B]` on the device."""
    partner_labels: torch.Tensor
    """int64 `[B]` on the device: the label of the sample each one was mixed with."""


@dataclass
class Batch:
    """One training batch (see the module docstring for each field's contract)."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor | None
    """Each sample's index in the split: int64 `[B]` on the host (None in a validation loader's
    `host_batches()`)."""
    teacher_images: torch.Tensor | None = None
    """The same crops at the teacher's own input size (None: the teacher sees `images`)."""
    mix: Mix | None = None
    """Set by the batch stage when it mixed the batch (None: hard labels)."""

    @property
    def size(self) -> int:
        return self.labels.shape[0]

    @property
    def teacher_view(self) -> torch.Tensor:
        """What a live teacher sees: its own view, else the student's images."""
        return self.images if self.teacher_images is None else self.teacher_images


@dataclass(frozen=True, kw_only=True)
class BatchSpec:
    """How batches must look on this run: decided by the runtime, honoured by every backend."""

    device: torch.device
    dtype: torch.dtype
    memory_format: torch.memory_format = torch.channels_last


@dataclass(frozen=True, kw_only=True)
class Shard:
    """This process's share of the data and of its node: `rank` of `world_size` (global),
    `local_rank` of `local_world_size` (processes on this node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1


@dataclass
class Loaders:
    train: Loader
    val: Loader
    classes: list[str]
    """Class identifiers in label order (folder names, WordNet ids or names from the class file)."""


def normalization(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and 1/std for uint8 pixel values, shaped to broadcast over NCHW."""
    mean = torch.tensor([255 * m for m in IMAGENET_MEAN], dtype=torch.float32).view(1, 3, 1, 1)
    inv_std = torch.tensor([1 / (255 * s) for s in IMAGENET_STD], dtype=torch.float32).view(1, 3, 1, 1)
    return mean.to(device, dtype), inv_std.to(device, dtype)


def check_batch(images: torch.Tensor, labels: torch.Tensor, *, spec: BatchSpec, image_size: int,
                num_classes: int, max_batch_size: int) -> None:
    """Assert the contract above (the tests run it over every backend); syncs the host."""
    assert images.dim() == 4 and images.shape[1] == 3, f"images shape {tuple(images.shape)}"
    assert tuple(images.shape[2:]) == (image_size, image_size), f"images shape {tuple(images.shape)}"
    assert 1 <= images.shape[0] <= max_batch_size, f"batch of {images.shape[0]}"
    assert images.dtype == spec.dtype, f"images dtype {images.dtype}, expected {spec.dtype}"
    assert images.device.type == spec.device.type, f"images on {images.device}"
    assert images.is_contiguous(memory_format=spec.memory_format), "images not in the expected memory format"
    assert labels.dtype == torch.int64 and labels.shape == (images.shape[0],), \
        f"labels {labels.dtype} {tuple(labels.shape)}"
    assert labels.device.type == spec.device.type, f"labels on {labels.device}"
    low, high = int(labels.min()), int(labels.max())
    assert 0 <= low and high < num_classes, f"labels within [{low}, {high}] for {num_classes} classes"
    assert torch.isfinite(images).all(), "non-finite pixels"
    assert -3.0 <= float(images.min()) and float(images.max()) <= 3.0, "pixels not normalized"
