"""RandAugment / TrivialAugmentWide in the batch stage: torchvision's ops, sample by sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.autoaugment import _apply_op

from pipelines.auto_augment import OPS, SIGNED, AutoAugment, magnitudes
from pipelines.base import normalization
from tests.conftest import batch_of

MEAN, INV_STD = normalization(torch.device("cpu"), torch.float32)


def normalized(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW as the torchvision backend hands them over (channels-last, normalized)."""
    return ((pixels.float() - MEAN) * INV_STD).contiguous(memory_format=torch.channels_last)


def as_pixels(images: torch.Tensor) -> torch.Tensor:
    return torch.round(images / INV_STD + MEAN).to(torch.uint8)


def photos(n: int, size: int, seed: int = 0, width: int | None = None) -> torch.Tensor:
    """Smooth gradients plus noise: every op has something to change (flat images hide most)."""
    g = torch.Generator().manual_seed(seed)
    width = width or size
    base = (torch.linspace(0, 1, size).view(1, 1, size, 1) * torch.rand(n, 3, 1, 1, generator=g) * 180
            + torch.linspace(0, 1, width).view(1, 1, 1, width) * torch.rand(n, 3, 1, 1, generator=g) * 60)
    return (base + torch.rand(n, 3, size, width, generator=g) * 20).clamp(0, 255).to(torch.uint8)


def forced(policy: str, ops: np.ndarray, negative: np.ndarray, bins: np.ndarray, **kw) -> AutoAugment:
    augment = AutoAugment(policy, seed=0, num_items=len(ops), **kw)
    augment.set_epoch(0)
    augment._draws = (ops, negative, bins)
    return augment


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
@pytest.mark.parametrize("op", OPS)
def test_each_op_is_torchvisions_on_uint8_pixels(policy, op):
    """Non-square images, so that a height taken for a width shows."""
    n, size, width = 8, 20, 28
    pixels = photos(n, size, width=width)
    ops = np.full((n, 1), OPS.index(op))
    negative = (np.arange(n) % 2 == 1)[:, None]
    # several magnitudes in one batch (RandAugment: its one magnitude)
    bins = (np.arange(n) * 4 % 31)[:, None] if policy == "trivialaugment" else np.full((n, 1), 9)
    augment = forced(policy, ops, negative, bins, num_ops=1, magnitude=9)
    out = as_pixels(augment(batch_of(normalized(pixels), torch.zeros(n, dtype=torch.long))).images)
    levels = magnitudes(policy, op, 31, width, size)
    for k in range(n):
        magnitude = float(levels[bins[k, 0]].item()) if levels is not None and levels.ndim > 0 else 0.0
        if op in SIGNED and negative[k, 0]:
            magnitude *= -1.0
        expected = _apply_op(pixels[k], op, magnitude, interpolation=InterpolationMode.NEAREST, fill=None)
        assert torch.equal(out[k], expected), (op, k, magnitude, (out[k].int() - expected.int()).abs().max())


def test_two_rounds_of_mixed_ops_are_torchvisions_in_sequence():
    n, size = 16, 24
    pixels = photos(n, size, seed=1)
    rng = np.random.default_rng(0)
    ops, negative = rng.integers(0, len(OPS), (n, 2)), rng.random((n, 2)) < 0.5
    augment = forced("randaugment", ops, negative, np.full((n, 2), 9), num_ops=2, magnitude=9)
    out = as_pixels(augment(batch_of(normalized(pixels), torch.zeros(n, dtype=torch.long))).images)
    for k in range(n):
        expected = pixels[k]
        for r in range(2):
            op = OPS[ops[k, r]]
            levels = magnitudes("randaugment", op, 31, size, size)
            magnitude = float(levels[9].item()) if levels is not None and levels.ndim > 0 else 0.0
            if op in SIGNED and negative[k, r]:
                magnitude *= -1.0
            expected = _apply_op(expected, op, magnitude, interpolation=InterpolationMode.NEAREST, fill=None)
        assert torch.equal(out[k], expected), (k, [OPS[i] for i in ops[k]])


def test_the_teacher_view_gets_the_same_ops_at_its_size():
    """Pixel ops are torchvision's on the teacher's view; geometric ones move it as they move the
    student's (translations scaled to its size): halved, it is the student's, up to resampling."""
    n = 8
    pixels = photos(n, 16)
    big = torch.nn.functional.interpolate(pixels.float(), size=(32, 32), mode="nearest").round().to(torch.uint8)
    names = ("Rotate", "TranslateX", "ShearY", "TranslateY", "Solarize", "Equalize", "Brightness", "AutoContrast")
    ops = np.array([[OPS.index(op)] for op in names])
    augment = forced("trivialaugment", ops, (np.arange(n) % 2 == 0)[:, None], np.full((n, 1), 6))
    out = augment(batch_of(normalized(pixels), torch.zeros(n, dtype=torch.long), teacher_images=normalized(big)))
    small, large = as_pixels(out.images), as_pixels(out.teacher_images)
    down = torch.nn.functional.avg_pool2d(large.float(), 2)
    for k, op in enumerate(names):
        if op in ("Rotate", "TranslateX", "ShearY", "TranslateY"):
            others = [(down[j] - small[k].float()).abs().mean() for j in range(n) if j != k]
            assert (down[k] - small[k].float()).abs().mean() < min(others) / 4, op
            assert not torch.equal(small[k], pixels[k])
        else:
            magnitude = float(magnitudes("trivialaugment", op, 31, 16, 16)[6]) if op in ("Solarize",
                                                                                          "Brightness") else 0.0
            if op == "Brightness" and k % 2 == 0:
                magnitude = -magnitude
            assert torch.equal(large[k], _apply_op(big[k], op, magnitude, interpolation=InterpolationMode.NEAREST,
                                                   fill=None)), op


def test_draws_follow_the_policies():
    ra = AutoAugment("randaugment", seed=3, num_items=50000, num_ops=2, magnitude=9)
    ra.set_epoch(0)
    ops, negative, bins = ra._draws
    assert ops.shape == (50000, 2) and (bins == 9).all()
    assert abs(np.bincount(ops.ravel(), minlength=14) / ops.size - 1 / 14).max() < 0.005
    ta = AutoAugment("trivialaugment", seed=3, num_items=50000)
    ta.set_epoch(0)
    ops, negative, bins = ta._draws
    assert ops.shape == (50000, 1) and abs(bins.mean() - 15) < 0.2 and abs(negative.mean() - 0.5) < 0.01
    ta.set_epoch(1)
    assert not np.array_equal(ta._draws[0], ops)
