"""RandAugment and TrivialAugmentWide in the batch stage: torchvision's op sets, magnitudes and
arithmetic (`torchvision.transforms.RandAugment` / `TrivialAugmentWide` on uint8 tensors,
nearest interpolation, fill 0), applied to whole batches on the training device with each
sample's own ops, drawn from (seed, epoch, sample index).

A batch arrives normalized (`pipelines.base`); it is taken back to its pixel values (uint8
values held in fp32: exact, since every backend normalizes uint8 pixels), each op runs on the
samples that drew it with their magnitudes, and the result is normalized again. Each op
reproduces torchvision's uint8 rounding (the blends truncate, the blur rounds, equalize is
integer arithmetic): `tests/test_auto_augment.py` compares every op with torchvision's, sample
by sample. The teacher's view of the same crops at its own size gets the same ops and
magnitudes, its translations scaled to its size.

Per step the host sorts the batch by op (the draws and the samples' indices are on the host)
and sends one small table per op round and view (the order and each sample's parameters),
copied from pinned memory on a GPU: no host sync, and no step waits for the device.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.base import Batch, device_constant, normalization
from pipelines.batch_stage import in_layout_of, table_to_device

OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
       "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
"""torchvision's op set of RandAugment and TrivialAugmentWide, in its order (a draw's op index)."""
SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"}
POLICIES = ("randaugment", "trivialaugment")
_SALT = 0x617567  # "aug": the draws' stream, apart from the order's, the crops' and the mixes'
_GEOMETRIC = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}
_COLUMNS = 10  # order, inverse order, theta (6), value, 1 - value


def magnitudes(policy: str, op: str, num_bins: int, width: int, height: int) -> torch.Tensor | None:
    """torchvision's magnitudes of `op` (None: the op takes none), as its `_augmentation_space`."""
    wide = policy == "trivialaugment"
    linear = {"ShearX": 0.99 if wide else 0.3, "ShearY": 0.99 if wide else 0.3,
              "TranslateX": 32.0 if wide else 150.0 / 331.0 * width,
              "TranslateY": 32.0 if wide else 150.0 / 331.0 * height,
              "Rotate": 135.0 if wide else 30.0}
    if op in linear:
        return torch.linspace(0.0, linear[op], num_bins)
    if op in ("Brightness", "Color", "Contrast", "Sharpness"):
        return torch.linspace(0.0, 0.99 if wide else 0.9, num_bins)
    if op == "Posterize":
        return 8 - (torch.arange(num_bins) / ((num_bins - 1) / (6 if wide else 4))).round().int()
    if op == "Solarize":
        return torch.linspace(255.0, 0.0, num_bins)
    return None


def inverse_affine(center: tuple[float, float], angle: float, translate: tuple[float, float],
                   shear: tuple[float, float]) -> list[float]:
    """The inverse affine matrix torchvision's `F.affine` / `F.rotate` sample with (scale 1)."""
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    (cx, cy), (tx, ty) = center, translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    m = [d, -b, 0.0, -c, a, 0.0]
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty)
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty)
    m[2] += cx
    m[5] += cy
    return m


def op_theta(op: str, magnitude: float, width: int, height: int, scale: float) -> list[float]:
    """A geometric op's matrix at a view of `width` x `height`; `scale`: the view's width over
    the student's (a translation is the student's whole pixels, scaled)."""
    if op in ("ShearX", "ShearY"):
        shear = math.degrees(math.atan(magnitude))
        return inverse_affine((-width * 0.5, -height * 0.5), 0.0, (0.0, 0.0),
                              (shear, 0.0) if op == "ShearX" else (0.0, shear))
    if op in ("TranslateX", "TranslateY"):
        pixels = float(int(magnitude)) * scale
        return inverse_affine((0.0, 0.0), 0.0, (pixels, 0.0) if op == "TranslateX" else (0.0, pixels), (0.0, 0.0))
    return inverse_affine((0.0, 0.0), -magnitude, (0.0, 0.0), (0.0, 0.0))  # Rotate, as F.rotate


class AutoAugment:
    """RandAugment (`num_ops` ops at `magnitude` of `num_bins`) or TrivialAugmentWide (one op at a
    magnitude drawn from `num_bins`) of training batches; a batch-stage transform."""

    name = "auto-augment"

    def __init__(self, policy: str, *, seed: int, num_items: int, num_ops: int = 2, magnitude: int = 9,
                 num_bins: int = 31):
        if policy not in POLICIES:
            raise ValueError(f"auto augment {policy!r}: expected one of {', '.join(POLICIES)}")
        self.policy = policy
        self.seed, self.num_items = seed, num_items
        self.num_ops = num_ops if policy == "randaugment" else 1
        self.magnitude, self.num_bins = magnitude, num_bins
        self._epoch: int | None = None
        self._draws: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._norm: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self._grids: dict[tuple[int, int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        """(h, w, device): torchvision's base grid `[1, h * w, 3]` and its half-size divisor `[2]`."""
        self._kernels: dict[torch.device, torch.Tensor] = {}
        self._lookup: dict[tuple[tuple[int, int], int, int], np.ndarray] = {}

    def describe(self) -> dict[str, Any]:
        return {"name": self.policy, "num_ops": self.num_ops,
                "magnitude": self.magnitude if self.policy == "randaugment" else "uniform", "num_bins": self.num_bins,
                "ops": "torchvision's 14", "interpolation": "nearest", "fill": 0,
                "draws": "numpy (seed, epoch) by sample index", "version": 1}

    def set_epoch(self, epoch: int) -> None:
        if epoch == self._epoch:
            return
        rng = np.random.default_rng([self.seed % 2**63, epoch, _SALT])
        shape = (self.num_items, self.num_ops)
        ops = rng.integers(0, len(OPS), shape)
        negative = rng.random(shape) < 0.5
        bins = rng.integers(0, self.num_bins, shape)
        if self.policy == "randaugment":
            bins = np.full(shape, self.magnitude)
        self._epoch, self._draws = epoch, (ops, negative, bins)

    def __call__(self, batch: Batch) -> Batch:
        assert self._draws is not None, "AutoAugment.set_epoch first"
        indices = batch.sample_indices()
        ops, negative, bins = (d[indices] for d in self._draws)
        student = (batch.images.shape[-2], batch.images.shape[-1])
        views = [self._augment(batch.images, ops, negative, bins, student)]
        if batch.teacher_images is not None:
            views.append(self._augment(batch.teacher_images, ops, negative, bins, student))
        return replace(batch, images=views[0], teacher_images=views[1] if len(views) > 1 else None)

    def _parameters(self, student: tuple[int, int], height: int, width: int) -> np.ndarray:
        """float64 `[len(OPS), num_bins, 2 (sign: +, -), 8]`: each (op, magnitude bin, sign)'s
        theta (6) and value, 1 - value, at a view of `height` x `width` of a student's batch of
        `student` (h, w): torchvision's magnitudes at the student's size, exactly; a teacher's
        view scales translations. Made once per size."""
        key = (student, height, width)
        if key not in self._lookup:
            table = np.zeros((len(OPS), self.num_bins, 2, 8))
            for o, op in enumerate(OPS):
                steps = magnitudes(self.policy, op, self.num_bins, student[1], student[0])
                levels = [0.0] * self.num_bins if steps is None else steps.tolist()
                for level, value in enumerate(levels):
                    for sign in (0, 1):
                        magnitude = -float(value) if sign and op in SIGNED else float(value)
                        row = table[o, level, sign]
                        if op in _GEOMETRIC:
                            row[:6] = op_theta(op, magnitude, width, height, width / student[1])
                        elif op in ("Brightness", "Color", "Contrast", "Sharpness"):
                            row[6], row[7] = 1.0 + magnitude, 1.0 - (1.0 + magnitude)
                        elif op == "Posterize":
                            row[6] = 2 ** (8 - int(magnitude))
                        elif op == "Solarize":
                            row[6] = magnitude
            self._lookup[key] = table
        return self._lookup[key]

    def _table(self, ops: np.ndarray, negative: np.ndarray, bins: np.ndarray, student: tuple[int, int],
               width: int, height: int) -> tuple[np.ndarray, list[tuple[str, int, int]]]:
        """One round's `[B, _COLUMNS]` float32 table (rows in the batch's order sorted by op) and the
        (op, first, end) slices of the sorted batch."""
        order = np.argsort(ops, kind="stable")
        table = np.empty((len(ops), _COLUMNS), dtype=np.float32)
        table[:, 0], table[:, 1] = order, np.argsort(order)
        table[:, 2:] = self._parameters(student, height, width)[ops[order], bins[order], negative[order].astype(int)]
        sorted_ops = ops[order]
        present = np.unique(sorted_ops)
        firsts = np.searchsorted(sorted_ops, present)
        ends = np.searchsorted(sorted_ops, present, side="right")
        return table, [(OPS[o], int(a), int(b)) for o, a, b in zip(present, firsts, ends)]

    def _augment(self, images: torch.Tensor, ops: np.ndarray, negative: np.ndarray, bins: np.ndarray,
                 student: tuple[int, int]) -> torch.Tensor:
        device, dtype = images.device, images.dtype
        mean, inv_std = self._normalization(device)
        pixels = torch.round(images.float() / inv_std + mean).clamp_(0, 255)  # the backend's uint8 values
        _, _, height, width = pixels.shape
        for r in range(self.num_ops):
            host, slices = self._table(ops[:, r], negative[:, r], bins[:, r], student, width, height)
            table = table_to_device(host, device)
            order, inverse = table[:, 0].long(), table[:, 1].long()
            work = pixels[order]
            for op, first, end in slices:
                if op != "Identity":
                    work[first:end] = self._apply(op, work[first:end], table[first:end])
            pixels = work[inverse]
        return in_layout_of(images, ((pixels - mean) * inv_std).to(dtype))

    def _normalization(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, torch.float32)
        if key not in self._norm:
            self._norm[key] = normalization(device, torch.float32)
        return self._norm[key]

    def _apply(self, op: str, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        value, rest = params[:, 8].view(n, 1, 1, 1), params[:, 9].view(n, 1, 1, 1)
        if op in _GEOMETRIC:
            return self._affine(x, params[:, 2:8].reshape(n, 2, 3))
        if op == "Brightness":
            return _blend(x, torch.zeros_like(x), value, rest)
        if op == "Color":
            return _blend(x, _grayscale(x).expand_as(x), value, rest)
        if op == "Contrast":
            return _blend(x, _grayscale(x).mean(dim=(-3, -2, -1), keepdim=True), value, rest)
        if op == "Sharpness":  # torchvision leaves images of 2 pixels or fewer a side as they are
            if min(x.shape[-2:]) <= 2:
                return x
            if x.device not in self._kernels:  # torchvision's kernel, made on the device (no copy)
                kernel = torch.ones((3, 3), device=x.device)
                kernel[1, 1] = 5.0
                self._kernels[x.device] = kernel / kernel.sum()
            return _blend(x, _blurred(x, self._kernels[x.device]), value, rest)
        if op == "Posterize":
            return torch.floor(x / value) * value
        if op == "Solarize":
            return torch.where(x >= value, 255.0 - x, x)
        if op == "AutoContrast":
            return _autocontrast(x)
        if op == "Equalize":
            return _equalize(x)
        raise AssertionError(op)

    def _affine(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """torchvision's `_gen_affine_grid` + nearest `grid_sample` with zeros outside, per sample."""
        n, _, h, w = x.shape
        key = (h, w, x.device)
        if key not in self._grids:
            base = torch.empty(1, h, w, 3, device=x.device)
            base[..., 0].copy_(torch.linspace(-w * 0.5 + 0.5, w * 0.5 + 0.5 - 1, steps=w, device=x.device))
            base[..., 1].copy_(torch.linspace(-h * 0.5 + 0.5, h * 0.5 + 0.5 - 1, steps=h, device=x.device).unsqueeze_(-1))
            base[..., 2].fill_(1)
            self._grids[key] = (base.view(1, h * w, 3), device_constant([0.5 * w, 0.5 * h], x.device))
        base, half = self._grids[key]  # made on the device once per size: no host-to-device copy
        grid = base.expand(n, h * w, 3).bmm(theta.transpose(1, 2) / half).view(n, h, w, 2)
        return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """torchvision's `_blend` on uint8 values: `ratio * x + (1 - ratio) * other`, clamped, truncated."""
    return torch.floor((ratio * x + rest * other).clamp(0, 255))


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """torchvision's `rgb_to_grayscale` of uint8 values (truncated), `[n, 1, H, W]`."""
    r, g, b = x.unbind(dim=-3)
    return torch.floor(0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(dim=-3)


def _blurred(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """torchvision's `_blurred_degenerate_image` (rounded), the border kept; `kernel`: its 3x3."""
    blurred = torch.round(F.conv2d(x, kernel.expand(x.shape[-3], 1, 3, 3), groups=x.shape[-3]))
    out = x.clone()
    out[..., 1:-1, 1:-1] = blurred
    return out


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    minimum = x.amin(dim=(-2, -1), keepdim=True)
    maximum = x.amax(dim=(-2, -1), keepdim=True)
    scale = 255.0 / (maximum - minimum)
    flat = ~torch.isfinite(scale)
    minimum = torch.where(flat, 0.0, minimum)
    scale = torch.where(flat, 1.0, scale)
    return torch.floor(((x - minimum) * scale).clamp(0, 255))


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """torchvision's `equalize` of each image's channels, with integer histograms and no branch."""
    n, c, h, w = x.shape
    values = x.reshape(n * c, h * w).long()
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, values, torch.ones_like(values))
    top = hist.gather(1, values.amax(dim=1, keepdim=True))  # the last non-empty bin's count
    step = torch.div(h * w - top, 255, rounding_mode="floor")
    lut = torch.div(hist.cumsum(1) + torch.div(step, 2, rounding_mode="floor"), step.clamp(min=1),
                    rounding_mode="floor")
    lut = F.pad(lut, [1, 0])[:, :-1].clamp(0, 255)
    out = torch.where(step == 0, values, lut.gather(1, values))
    return out.view(n, c, h, w).to(x.dtype)
