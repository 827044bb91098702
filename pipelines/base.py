"""The batch contract every data backend honours, written once, and the loader that delivers it.

A loader is a host stage followed by an ordered list of device stages (`Loader`), as ffcv's
pipelines are lists of operations. Iterating it yields `Batch`es, in training and validation:

- `images`: `[B, 3, H, W]` floating tensor on the training device, channels-last memory,
  normalized with the ImageNet mean/std (values roughly within [-2.2, 2.7]); float32 on the
  CPU or with fp32 precision, float16 on a GPU with reduced precision (autocast takes it on).
- `labels`: int64 `[B]` on the same device, values in `[0, num_classes)`.
- `indices`: each sample's index in the split, int64 `[B]` on the host (what a teacher cache is
  keyed by); None in validation batches of backends that do not track them.
- `teacher_images`: the teacher's view of the same crops at its own input size, or None.
- `mix`: set by the mixing stage (`pipelines.batch_stage.Mixing`), else None.
- `len(loader)` is the number of batches of one epoch on this process (a training loader's
  partial last batch left out with `data.drop_last`, the default; validation's always in);
  `loader.num_samples` the number of images dealt to this process per epoch (those of a left-out
  batch included).

The host stage (`HostStage`: a backend's decoding, on the host for a CPU decoder) yields batches
as the backend makes them; the device stages (`DeviceStage`: the copy to the device and its
normalization, RandAugment, mixing) each take a batch and return one, run in order by
`run_stages`, which `fastkd bench` also calls to time them one by one. The loop never branches on
the backend: it only relies on this contract and on `set_epoch(epoch, start_batch)` /
`state_dict()` / `load_state_dict()` for exact resume.
"""

from __future__ import annotations

from dataclasses import dataclass
import contextlib
from typing import Any, Callable, ContextManager, Iterator, Protocol, Sequence

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    """One batch (see the module docstring for each field's contract)."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor | None
    """Each sample's index in the split: int64 `[B]` on the host (None in validation batches that
    do not track them)."""
    teacher_images: torch.Tensor | None = None
    """The same crops at the teacher's own input size (None: the teacher sees `images`)."""
    mix: Mix | None = None
    """Set by the batch stage when it mixed the batch (None: hard labels)."""

    @property
    def size(self) -> int:
        return self.labels.shape[0]

    def sample_indices(self) -> np.ndarray:
        """`indices` as a host array (what the batch stage's draws and a teacher cache are read by)."""
        if self.indices is None:
            raise ValueError("this batch carries no sample indices (training batches do)")
        return self.indices.numpy()

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


class HostStage(Protocol):
    """A backend's first stage: one epoch's batches as the backend makes them (host memory, HWC,
    for a CPU decoder), from a given batch on, as a pure function of (seed, epoch, batch)."""

    num_samples: int
    """Images this process sees per epoch."""
    batch_size: int
    prefetched_batches: int
    """Batches the stage can hold ready before one is asked for (its workers' queues): what a
    benchmark's warm-up must drain so as to time the loader, not a queue."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Batch]: ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Prepare the next `iter()` to yield epoch `epoch` from batch `start_batch` on."""

    def state_dict(self) -> dict[str, Any]:
        """What, beyond (epoch, batch), is needed to resume the stream exactly."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class DeviceStage(Protocol):
    """One operation on whole batches on the training device: a pure function of the batch and
    the epoch (its draws come from (seed, epoch, sample index)), adding no host sync."""

    name: str
    """How `fastkd bench` names its time per batch."""

    def set_epoch(self, epoch: int) -> None: ...

    def __call__(self, batch: Batch) -> Batch: ...


def run_stages(batch: Batch, stages: Sequence[DeviceStage],
               timed: Callable[[str, Callable[[], Batch]], Batch] | None = None) -> Batch:
    """`batch` through `stages` in order: the one place device stages run. `timed(name, run)`, when
    given, runs each stage (the bench times them one by one)."""
    for stage in stages:
        batch = stage(batch) if timed is None else timed(stage.name, lambda: stage(batch))  # noqa: B023
    return batch


class Loader:
    """A host stage and the device stages after it; iterating it yields the contract's `Batch`es.

    The device stages run inside `guard()` (the runtime's `no_host_sync` for training: with
    `runtime.sync_debug` on a GPU, a host sync in any of them raises)."""

    def __init__(self, host: HostStage, stages: Sequence[DeviceStage] = (),
                 guard: Callable[[], ContextManager] = contextlib.nullcontext):
        self.host = host
        self.stages = list(stages)
        self.guard = guard

    @property
    def num_samples(self) -> int:
        return self.host.num_samples

    @property
    def batch_size(self) -> int:
        return self.host.batch_size

    @property
    def prefetched_batches(self) -> int:
        return self.host.prefetched_batches

    def __len__(self) -> int:
        return len(self.host)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.host.set_epoch(epoch, start_batch)
        for stage in self.stages:
            stage.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.host.state_dict()  # the device stages are pure functions of (seed, epoch, sample)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.host.load_state_dict(state)

    def device_stages(self, batch: Batch) -> Batch:
        """A host-stage batch through the device stages, inside the guard."""
        with self.guard():
            return run_stages(batch, self.stages)

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.host:
            yield self.device_stages(batch)


@dataclass
class Loaders:
    train: Loader
    val: Loader
    classes: list[str]
    """Class identifiers in label order (folder names, WordNet ids or names from the class file)."""


def needs_pinned_memory(device: torch.device) -> bool:
    """Whether host data bound for `device` is staged in pinned (page-locked) memory: on an
    accelerator, where only a copy from pinned memory is queued without waiting for the device
    (a copy from pageable memory synchronizes the host)."""
    return device.type != "cpu"


def device_constant(values: list[float], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A small constant made on `device` itself (one fill per value): no host-to-device copy, so
    it may be made lazily inside a step (a `torch.tensor(values, device=...)` copies from pageable
    memory, which waits for the device)."""
    out = torch.empty(len(values), dtype=torch.float32, device=device)
    for i, value in enumerate(values):
        out[i] = value
    return out.to(dtype)


def normalization(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and 1/std for uint8 pixel values, shaped to broadcast over NCHW, made on the device."""
    mean = device_constant([255 * m for m in IMAGENET_MEAN], device, dtype).view(1, 3, 1, 1)
    inv_std = device_constant([1 / (255 * s) for s in IMAGENET_STD], device, dtype).view(1, 3, 1, 1)
    return mean, inv_std


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
