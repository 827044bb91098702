"""The batch stage: transforms of whole training batches on the training device, after a
backend has decoded, cropped, resized, flipped and normalized them, the same for every
backend: device stages (`pipelines.base.DeviceStage`) after a loader's copy to the device.

Its transforms, in order: RandAugment or TrivialAugmentWide (`pipelines.auto_augment`), then
mixup and CutMix (`Mixing`), with timm's semantics
(`timm.data.mixup.Mixup` in its "pair" and "elem" modes): a sample is mixed with its partner,
the other sample of its pair of positions (2m, 2m + 1) in the epoch's order; mixup blends the
two images with weight `lam ~ Beta(mixup_alpha, mixup_alpha)`, CutMix pastes a box of the
partner's image (its side `sqrt(1 - lam)` of the image's, `lam ~ Beta(cutmix_alpha,
cutmix_alpha)`, its centre uniform; `lam` then corrected to the box's real area); with both
alphas, CutMix with probability `switch_prob`; a pair (or sample) is mixed at all with
probability `prob`. Targets are the labels of both, weighted by the area-corrected `lam`
(`pipelines.base.Mix`).

Every draw is a pure function of (seed, epoch, sample index), and the pairs of the epoch's
order: the same whatever the batch size (even), number of processes (`epoch_order` deals the
pairs out whole) or backend. A teacher's view of the same crops at its own size is mixed with
the same partners, weights and box (scaled to its size), so the teacher sees the image the
student sees (its box drawn from the same fractions at its own size) and a teacher cache
recorded per (epoch, sample) replays it.

A draw costs nothing per step: each epoch's are drawn at once (a few values per sample, on
the host), and a batch takes its rows by index; what reaches the device per step is one small
`[B, 10]` table, copied from pinned memory without a host sync.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
import torch

from pipelines.base import Batch, DeviceStage, Mix, needs_pinned_memory

MIX_MODES = ("pair", "elem")
"""timm's modes that do not depend on the batch: one draw per pair of positions, or per sample.
timm's "batch" mode (one draw per batch) is left out: it would tie the stream to the batch size."""
_MIX_SALT = 0x6D6978  # "mix": the draws' stream, apart from the order's and the crops'


@dataclass(frozen=True)
class MixSpec:
    """mixup / CutMix settings (`data.mix`: `mixup_alpha`, `cutmix_alpha`, `prob`, `switch_prob`,
    `mode`)."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5
    mode: str = "pair"

    def describe(self) -> dict[str, Any]:
        """What a teacher cache records of it (every value the mixed images depend on)."""
        return {"name": "mix", "mixup_alpha": float(self.mixup_alpha), "cutmix_alpha": float(self.cutmix_alpha),
                "prob": float(self.prob), "switch_prob": float(self.switch_prob), "mode": self.mode,
                "pairs": "positions (2m, 2m+1) of the epoch's order", "draws": "numpy (seed, epoch) by sample index",
                "version": 1}


@dataclass(frozen=True)
class MixDraws:
    """One epoch's draws, one row per sample index of the split."""

    lam: np.ndarray
    """float64 `[N]`: the sample's own share (1: not mixed), before CutMix's area correction."""
    cut: np.ndarray
    """bool `[N]`: CutMix rather than mixup."""
    centre: np.ndarray
    """float64 `[N, 2]`: the box centre's (y, x) as fractions of the image's side, in [0, 1)."""


def mix_draws(spec: MixSpec, *, seed: int, epoch: int, num_items: int) -> MixDraws:
    """The draws of every sample of one epoch, as timm's `Mixup._params_per_elem` makes them."""
    rng = np.random.default_rng([seed % 2**63, epoch, _MIX_SALT])
    # Every array is drawn whatever the settings, so that one setting never shifts another's values.
    switch, apply = rng.random(num_items), rng.random(num_items)
    lam_mixup = rng.beta(spec.mixup_alpha, spec.mixup_alpha, num_items) if spec.mixup_alpha > 0 else np.ones(num_items)
    lam_cutmix = (rng.beta(spec.cutmix_alpha, spec.cutmix_alpha, num_items) if spec.cutmix_alpha > 0
                  else np.ones(num_items))
    centre = rng.random((num_items, 2))
    if spec.mixup_alpha > 0 and spec.cutmix_alpha > 0:
        cut = switch < spec.switch_prob
    else:
        cut = np.full(num_items, spec.cutmix_alpha > 0)
    lam = np.where(apply < spec.prob, np.where(cut, lam_cutmix, lam_mixup), 1.0)
    return MixDraws(lam=lam, cut=cut, centre=centre)


def cut_boxes(lam: np.ndarray, centre: np.ndarray, height: int, width: int) -> np.ndarray:
    """int64 `[B, 4]` boxes (top, bottom, left, right; bottom/right exclusive) of `lam`'s CutMix
    at this image size: timm's `rand_bbox` without margin, its centre given as fractions."""
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = (height * ratio).astype(np.int64), (width * ratio).astype(np.int64)
    cy, cx = (centre[:, 0] * height).astype(np.int64), (centre[:, 1] * width).astype(np.int64)
    return np.stack([np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height),
                     np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)], axis=1)


class BatchTransform(DeviceStage, Protocol):
    """One transform of the batch stage: a device stage that changes what the models see."""

    def describe(self) -> dict[str, Any]:
        """Its name and every parameter the output depends on (a teacher cache's key records it)."""


class Mixing:
    """mixup / CutMix of training batches (see the module docstring)."""

    name = "mix"

    def __init__(self, spec: MixSpec, *, seed: int, num_items: int):
        if spec.mode not in MIX_MODES:
            raise ValueError(f"mix mode {spec.mode!r}: expected one of {', '.join(MIX_MODES)}")
        self.spec = spec
        self.seed = seed
        self.num_items = num_items
        self._epoch: int | None = None
        self._draws: MixDraws | None = None
        self._swaps: dict[tuple[int, torch.device], torch.Tensor] = {}

    def describe(self) -> dict[str, Any]:
        return self.spec.describe()

    def set_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._epoch, self._draws = epoch, mix_draws(self.spec, seed=self.seed, epoch=epoch,
                                                        num_items=self.num_items)

    def _swap(self, size: int, device: torch.device) -> torch.Tensor:
        """Each slot's partner: 1, 0, 3, 2, ... (made on the device, once per batch size and device)."""
        key = (size, device)
        if key not in self._swaps:
            self._swaps[key] = torch.arange(size, device=device) ^ 1
        return self._swaps[key]

    def table(self, indices: np.ndarray, sizes: list[tuple[int, int]]) -> np.ndarray:
        """float32 `[B, 2 + 4 * len(sizes)]` per slot: the pixel weight of its own image (1 under
        CutMix), its target weight (area-corrected), then its box at each (height, width) of
        `sizes` (empty when not cut)."""
        assert self._draws is not None, "Mixing.set_epoch first"
        draws = self._draws
        # "pair": both slots of a pair take the draws of the pair's first sample.
        rows = np.repeat(indices[0::2], 2) if self.spec.mode == "pair" else indices
        lam, cut, centre = draws.lam[rows], draws.cut[rows], draws.centre[rows]
        boxes = [np.where(cut[:, None], cut_boxes(lam, centre, h, w), 0) for h, w in sizes]
        (height, width), box = sizes[0], boxes[0]
        area = (box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])
        target = np.where(cut, 1.0 - area / (height * width), lam)
        pixel = np.where(cut, 1.0, lam)
        return np.concatenate([np.stack([pixel, target], axis=1), *boxes], axis=1).astype(np.float32)

    def __call__(self, batch: Batch) -> Batch:
        size = batch.size
        if size % 2:
            raise ValueError(f"mixing pairs samples: a batch of {size} cannot be paired (the batch size and each "
                             "rank's share of the epoch must be even)")
        views = [batch.images] + ([batch.teacher_images] if batch.teacher_images is not None else [])
        device = batch.images.device
        host = self.table(batch.sample_indices(), [(v.shape[-2], v.shape[-1]) for v in views])
        table = table_to_device(host, device)
        swap = self._swap(size, device)
        # What the host table already says (no sync): whether any slot blends, whether any box is
        # cut at each view's size. Skipping a lerp by weight 1 or an empty paste leaves every finite
        # pixel as it was (the lerp would only turn a -0.0 into +0.0).
        blend = bool((host[:, 0] != 1.0).any())
        mixed = []
        for k, view in enumerate(views):
            top, bottom, left, right = host[:, 2 + 4 * k:6 + 4 * k].T
            paste = bool(((bottom > top) & (right > left)).any())
            mixed.append(_mix_view(view, swap, table[:, 0], table[:, 2 + 4 * k:6 + 4 * k], blend=blend, paste=paste))
        mix = Mix(weight=table[:, 1], partner_labels=batch.labels[swap])
        return replace(batch, images=mixed[0], teacher_images=mixed[1] if len(mixed) > 1 else None, mix=mix)


def _mix_view(images: torch.Tensor, swap: torch.Tensor, pixel: torch.Tensor, boxes: torch.Tensor, *,
              blend: bool = True, paste: bool = True) -> torch.Tensor:
    """`images` blended with their partners by `pixel` weight, their partners' pixels pasted in
    `boxes` (top, bottom, left, right), in the images' memory format and dtype. `blend=False`
    (every weight 1) skips the blend, `paste=False` (every box empty) the paste, with the same finite
    pixels; with neither, the result may be `images` itself (nothing downstream writes to it)."""
    batch, _, height, width = images.shape
    if not (blend or paste):
        return in_layout_of(images, images)
    partner = images[swap]
    if blend:
        weight = pixel.to(images.dtype).view(batch, 1, 1, 1)
        blended = torch.lerp(partner, images, weight)  # weight 1 (CutMix, unmixed): the image itself
    else:
        blended = images
    if not paste:
        return in_layout_of(images, blended)
    rows = torch.arange(height, device=images.device, dtype=boxes.dtype).view(1, 1, height, 1)
    cols = torch.arange(width, device=images.device, dtype=boxes.dtype).view(1, 1, 1, width)
    top, bottom, left, right = (boxes[:, k].view(batch, 1, 1, 1) for k in range(4))
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    return in_layout_of(images, torch.where(inside, partner, blended))


def table_to_device(table: np.ndarray, device: torch.device) -> torch.Tensor:
    """A transform's small per-step host table on the device: on a GPU from pinned memory, so the
    copy is queued on the stream (a copy from pageable memory would wait for it)."""
    host = torch.from_numpy(table)
    if needs_pinned_memory(device):
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def in_layout_of(images: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out` in the memory format of the batch it was made from (the contract's channels-last)."""
    if images.is_contiguous(memory_format=torch.channels_last):
        return out.contiguous(memory_format=torch.channels_last)
    return out.contiguous()
