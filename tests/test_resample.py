"""Crops finished by torch on the CPU (`pipelines.resample`), against PIL's resize (what the
torchvision backend uses), and the batch pool's reuse rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.base import IMAGENET_MEAN, IMAGENET_STD
from pipelines import resample
from pipelines.resample import BatchBuffers, CropFinisher


def pil_reference(crop: np.ndarray, size: int, flip: bool) -> torch.Tensor:
    """torchvision's path: PIL's bilinear (antialiased) resize, flip, then (x / 255 - mean) / std."""
    image = Image.fromarray(crop).resize((size, size), Image.BILINEAR)
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float64) / 255)
    return ((pixels - torch.tensor(IMAGENET_MEAN, dtype=torch.float64)) / torch.tensor(IMAGENET_STD, dtype=torch.float64))


@pytest.mark.parametrize("size", [32, 224])
def test_finished_crops_match_pil_within_a_grey_level(size):
    rng = np.random.default_rng(0)
    shapes = [(300, 280), (size, size), (size // 2 + 3, size + 17), (611, 97)]  # down, same, up, stretched
    crops = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    for crop in crops[:2]:  # smooth content as well as noise
        crop[:] = np.linspace(0, 255, crop.shape[1], dtype=np.uint8)[None, :, None]
    flips = [True, False, True, False]
    batch = CropFinisher()(lambda k: torch.from_numpy(crops[k]), flips, size)
    assert batch.shape == (4, size, size, 3) and batch.dtype == torch.float32
    assert batch.permute(0, 3, 1, 2).is_contiguous(memory_format=torch.channels_last)
    grey_level = 1 / 255 / min(IMAGENET_STD)
    for k, (crop, flip) in enumerate(zip(crops, flips)):
        difference = (batch[k].double() - pil_reference(crop, size, flip)).abs()
        assert difference.mean() < 0.25 * grey_level, (k, difference.mean() / grey_level)  # rounding only
        assert difference.max() <= 1.01 * grey_level, (k, difference.max() / grey_level)


def test_a_batch_is_reused_only_once_nobody_holds_it():
    pool = BatchBuffers(capacity=2)
    first = pool.empty((2, 4, 4, 3), torch.float32)
    address = first.data_ptr()
    view = first.permute(0, 3, 1, 2)[:1]  # what a caller keeps: a view, not the tensor itself
    del first
    second = pool.empty((2, 4, 4, 3), torch.float32)
    assert second.data_ptr() != address  # the view still holds the first batch
    del view, second
    assert pool.empty((2, 4, 4, 3), torch.float32).data_ptr() == address  # released: reused
    held = [pool.empty((2, 4, 4, 3), torch.float32) for _ in range(4)]  # more than the pool holds
    assert len({t.data_ptr() for t in held}) == 4
    del held
    other = pool.empty((1, 8, 8, 3), torch.float32)  # a new size evicts a free batch of the old size
    address = other.data_ptr()
    del other
    assert pool.empty((1, 8, 8, 3), torch.float32).data_ptr() == address


def test_the_private_use_count_answers_as_the_pool_expects_on_this_torch():
    """The pool's reuse rests on a private torch call; a torch that changed it would make every
    batch a new one (slower, still right): this says so at once rather than in a benchmark."""
    assert resample.can_count_storage_users()


@pytest.mark.parametrize("broken", ["missing", "wrong"])
def test_without_a_working_use_count_every_batch_is_new(monkeypatch, broken):
    if broken == "missing":
        monkeypatch.delattr(torch._C, "_storage_Use_Count")
    else:  # still there, but it no longer counts views
        monkeypatch.setattr(torch._C, "_storage_Use_Count", lambda cdata: 1)
    resample.can_count_storage_users.cache_clear()
    try:
        assert not resample.can_count_storage_users()
        pool = BatchBuffers(capacity=2)
        for _ in range(3):  # a working pool would keep (and hand out again) the released batch
            assert pool.empty((2, 4, 4, 3), torch.float32).shape == (2, 4, 4, 3)
        assert pool._pool == []  # nothing pooled: no batch can be handed out twice
    finally:
        monkeypatch.undo()
        resample.can_count_storage_users.cache_clear()
    assert resample.can_count_storage_users()


def test_a_batch_saved_for_backward_is_not_reused():
    """Only the autograd graph holds the batch (the caller dropped it): not free yet."""
    pool = BatchBuffers(capacity=2)
    batch = pool.empty((2, 8, 8, 3), torch.float32).normal_()
    address = batch.data_ptr()
    conv = torch.nn.Conv2d(3, 4, 3)
    loss = conv(batch.permute(0, 3, 1, 2)).square().sum()  # the input is saved for the weight's gradient
    del batch
    again = pool.empty((2, 8, 8, 3), torch.float32)
    assert again.data_ptr() != address
    loss.backward()
    del loss, again
    assert pool.empty((2, 8, 8, 3), torch.float32).data_ptr() == address  # the graph is gone: reused


def test_non_contiguous_crops_are_finished_like_contiguous_ones():
    crop = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    strided = crop.permute(1, 0, 2).contiguous().permute(1, 0, 2)  # same pixels, other strides
    assert not strided.is_contiguous()
    finish = CropFinisher()
    assert torch.equal(finish(lambda k: crop, [True], 16).clone(), finish(lambda k: strided, [True], 16))
