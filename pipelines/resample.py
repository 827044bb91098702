"""Training crops resized, flipped and normalized on the CPU with torch's uint8 kernels.

DALI's CPU path decodes each sample's crop window in its threads; what follows the decoder
runs here instead of in DALI's `fn.resize` + `fn.crop_mirror_normalize`, because on the CPU
DALI's resize costs more than the decoding (`fastkd bench --what loader-stages`). torch's
uint8 antialiased bilinear kernel (the one torchvision's v2 transforms use, within a grey level
of PIL's) is several times faster, and each crop is finished while it is in the cache:

    crop (HWC uint8, any size) -> resize to size x size -> flip -> normalize into its slot of a
    channels-last float batch

The float batches come from a `BatchBuffers` pool: a fresh 38 MB batch (64 x 224 px, fp32)
is mapped anew by the allocator and page-faulted in on every write, which alone costs more
than the resize; a pooled batch is reused only once nothing else holds its memory.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from pipelines.base import IMAGENET_MEAN, IMAGENET_STD


def _storage_users(tensor: torch.Tensor) -> int:
    """How many tensors (views included) share `tensor`'s memory.

    torch has no public call for this; `torch._C._storage_Use_Count` is private and may change
    or go. `can_count_storage_users()` checks once that it still answers as expected, and when
    it does not, `BatchBuffers` hands out a new tensor every time: slower, never wrong."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


@functools.cache
def can_count_storage_users() -> bool:
    """Whether `_storage_users` works on this torch: it exists, counts a view as a second user
    and sees the view go (checked once per process)."""
    try:
        tensor = torch.empty(4)
        alone = _storage_users(tensor)
        view = tensor[1:]
        shared = _storage_users(tensor)
        del view
        return isinstance(alone, int) and shared == alone + 1 and _storage_users(tensor) == alone
    except Exception:  # missing, renamed or with another signature: allocate anew instead
        return False


class BatchBuffers:
    """Reusable batch tensors: `empty()` hands out a pooled tensor no one else references (not
    the one a caller still holds, nor any view of it), or a new one while the pool has room.

    Reuse is decided by the memory's reference count, so a batch kept by the caller (a list of
    batches, a view of one, a tensor saved for backward, a NumPy array over it) is never
    overwritten. What the count cannot see: a caller that keeps only the batch's
    `untyped_storage()` object, or shares the batch with another process; keep a tensor (or a
    copy) instead.
    """

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self._pool: list[tuple[torch.Tensor, int]] = []
        """(tensor, the use count of its memory when only the pool holds it)."""

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        shape = tuple(shape)
        if self.capacity == 0 or not can_count_storage_users():
            return torch.empty(shape, dtype=dtype)
        free = [i for i, (tensor, alone) in enumerate(self._pool) if _storage_users(tensor) == alone]
        for i in free:
            tensor = self._pool[i][0]
            if tensor.shape == shape and tensor.dtype == dtype:
                return tensor.view(shape)  # a view: holding it counts as a use of the memory
        tensor = torch.empty(shape, dtype=dtype)
        if len(self._pool) >= self.capacity:
            if not free:  # the caller keeps every batch: nothing to recycle
                return tensor
            del self._pool[free[0]]  # a free batch of another shape (the image size changed)
        self._pool.append((tensor, _storage_users(tensor)))
        return tensor.view(shape)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one thread: a crop is too small to split, and DALI's decoding threads hold the
    other cores (a second thread on such small work only slows it). The setting is
    the process's: it is only changed on the main thread, which runs the training step too (a
    loader iterated on another thread would change it under a running step)."""
    threads = torch.get_num_threads()
    if threading.current_thread() is not threading.main_thread() or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _as_image_batch(hwc: torch.Tensor) -> torch.Tensor:
    """An HWC uint8 image as a `[1, 3, H, W]` channels-last view (no copy).

    Strided so that the batch dimension's stride is the image's size: `interpolate` then keeps
    the output channels-last (for a batch of one it would otherwise allocate it contiguous and
    repack it, as torchvision's v2 `resize` notes) and takes its fast uint8 path.
    """
    if not hwc.is_contiguous():
        hwc = hwc.contiguous()
    h, w, c = hwc.shape
    return hwc.as_strided((1, c, h, w), (h * w * c, 1, w * c, c))


class CropFinisher:
    """Resize, flip and normalize decoded crops into one batch honouring `pipelines.base`'s contract."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        self.dtype = dtype
        self._buffers = BatchBuffers()
        # Normalization as a multiply-add on rows of interleaved RGB values: one pass, long
        # contiguous rows (a [1, 3, 1, 1] broadcast over channels-last memory is far slower).
        self._scale = torch.tensor([1 / (255 * s) for s in IMAGENET_STD])
        self._shift = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
        self._rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _row_constants(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if size not in self._rows:
            self._rows[size] = (self._scale.repeat(size).to(self.dtype), self._shift.repeat(size).to(self.dtype))
        return self._rows[size]

    def __call__(self, crops: Callable[[int], torch.Tensor], flips: Sequence[bool], size: int) -> torch.Tensor:
        """`crops(k)`: sample k's decoded crop, HWC uint8; returns the `[B, size, size, 3]` batch
        (as DALI's HWC outputs: `permute(0, 3, 1, 2)` is the contract's channels-last view)."""
        scale, shift = self._row_constants(size)
        batch = self._buffers.empty((len(flips), size, size, 3), self.dtype)
        with _one_thread():
            self._finish_into(batch, crops, flips, size, scale, shift)
        return batch

    @staticmethod
    def _finish_into(batch, crops, flips, size, scale, shift) -> None:
        for k, flip in enumerate(flips):
            image = F.interpolate(_as_image_batch(crops(k)), size=(size, size), mode="bilinear",
                                  align_corners=False, antialias=True)
            if flip:
                image = image.flip(3)
            rows = image[0].permute(1, 2, 0).reshape(size, size * 3)  # a view: the output is channels-last
            torch.addcmul(shift, rows, scale, out=batch[k].view(size, size * 3))
