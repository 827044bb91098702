"""Training augmentation as explicit numbers: the sample order and each sample's crop and flip
are pure functions of (seed, epoch, sample index).

Every backend cuts the same crops from the same samples in the same order (torchvision with
PIL, DALI on the CPU or the GPU), whatever the batch size, the number of workers or of
processes; a resumed run continues the stream exactly, and a teacher's logits recorded for
(epoch, sample) fit the crop a student sees again later (`fastkd.teacher_cache`).

Light on purpose (NumPy and PIL only): DALI's Python workers import it.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

CROP_AREA = (0.08, 1.0)
"""RandomResizedCrop's range of the crop's area, as a fraction of the image's."""
CROP_RATIO = (3 / 4, 4 / 3)
"""RandomResizedCrop's range of the crop's aspect ratio (width / height)."""
FLIP_PROBABILITY = 0.5
AUGMENTATION = {"crop_area": list(CROP_AREA), "crop_ratio": list(CROP_RATIO), "flip": FLIP_PROBABILITY,
                "resize": "antialiased bilinear", "order": "numpy permutation of (seed, epoch)", "version": 1}
"""What defines the training stream besides the seed, files and image size, with the default
crop ranges (teacher caches record it, `augmentation_spec`, and refuse a stream made otherwise)."""


@dataclass(frozen=True)
class CropRange:
    """RandomResizedCrop's ranges: the crop's `area` as a fraction of the image's, its aspect
    `ratio` (width / height). `data.crop_scale` and `data.crop_ratio`."""

    area: tuple[float, float] = CROP_AREA
    ratio: tuple[float, float] = CROP_RATIO


def augmentation_spec(crop: CropRange = CropRange()) -> dict[str, Any]:
    """The stream's description for a teacher cache's key: `AUGMENTATION` with these crop ranges."""
    return {**AUGMENTATION, "crop_area": [float(v) for v in crop.area], "crop_ratio": [float(v) for v in crop.ratio]}

_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Augmentation seed of one sample in one epoch: independent of rank, worker and position.

    NumPy's SeedSequence mixes (seed, epoch, index) into 64 bits by a documented, stable hash
    (unlike Python's `hash`, whose values no version promises): the stream, and exact resume,
    do not depend on the interpreter.
    """
    words = [seed % 2**64, epoch, index]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0])


def random_resized_crop_box(width: int, height: int, rng: random.Random,
                            area: tuple[float, float] = CROP_AREA,
                            ratio: tuple[float, float] = CROP_RATIO) -> tuple[int, int, int, int]:
    """(top, left, height, width) drawn as torchvision's RandomResizedCrop.get_params does."""
    image_area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = image_area * rng.uniform(*area)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    # Fallback: centre crop at the closest allowed aspect ratio.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class Crop:
    """One training sample's augmentation, in pixels of the decoded (EXIF-oriented) image."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


def train_crop(seed: int, epoch: int, index: int, width: int, height: int, crop: CropRange = CropRange()) -> Crop:
    """The random-resized crop (within `crop`'s ranges) and horizontal flip of sample `index` in `epoch`."""
    rng = random.Random(sample_seed(seed, epoch, index))
    top, left, h, w = random_resized_crop_box(width, height, rng, area=crop.area, ratio=crop.ratio)
    return Crop(top, left, h, w, rng.random() < FLIP_PROBABILITY)


@dataclass(frozen=True)
class SizeSchedule:
    """The training image side of each epoch (FFCV's progressive resizing): `start` up to epoch
    `first`, then growing linearly to `end` at epoch `last`, rounded to the nearest multiple of
    `step` (halves up); `end` from then on. Fixed at `end` without a `start`.

    A pure function of the epoch, like the rest of the stream: every backend, rank and resumed
    run sees the same size in the same epoch."""

    end: int
    start: int | None = None
    first: int = 0
    last: int = 1
    step: int = 32

    def at(self, epoch: int) -> int:
        if self.start is None or epoch >= self.last:
            return self.end
        if epoch <= self.first:
            return self.start
        size = self.start + (self.end - self.start) * (epoch - self.first) / (self.last - self.first)
        return int(math.floor(size / self.step + 0.5)) * self.step

    def describe(self) -> int | dict[str, int]:
        """The size, or the schedule's numbers (what a teacher cache records)."""
        if self.start is None:
            return self.end
        return {"start": self.start, "end": self.end, "first": self.first, "last": self.last, "step": self.step}


def samples_per_rank(num_items: int, world_size: int, deal: int = 1) -> int:
    """Training samples each rank takes per epoch: the same on every rank (`epoch_order` pads),
    a multiple of `deal`."""
    return -(-num_items // (world_size * deal)) * deal


def batches_per_epoch(num_samples: int, batch_size: int, drop_last: bool) -> int:
    """Batches in one epoch of `num_samples` (one rank's): the partial last batch left out when
    `drop_last` (training's default, `data.drop_last`), kept otherwise (validation always)."""
    return num_samples // batch_size if drop_last else -(-num_samples // batch_size)


def epoch_order(num_items: int, *, seed: int, epoch: int, shuffle: bool, rank: int = 0,
                world_size: int = 1, deal: int = 1) -> list[int]:
    """This rank's sample indices for one epoch, in the order they are seen.

    Training (`shuffle`): a permutation drawn from (seed, epoch), cut into runs of `deal`
    consecutive positions (the last one completed with its own last sample), the runs padded by
    wrapping to a multiple of the world size so every rank takes the same number of steps (as
    PyTorch's DistributedSampler), then dealt out run `rank::world_size`. `deal` 2 keeps each
    pair of positions (2m, 2m + 1), which mixup and CutMix mix together
    (`pipelines.batch_stage`), on one rank whatever the world size, and every copy of a padded
    sample in the same pair (an odd count's last sample is paired with itself: left unmixed);
    with `deal` 1 (no mixing) the positions are dealt out one by one, as before mixing existed.
    Validation: the natural order, dealt out one by one without padding, so every image is
    counted exactly once across ranks.
    """
    if not shuffle:
        return list(range(num_items))[rank::world_size]
    order = np.random.default_rng([seed % 2**63, epoch]).permutation(num_items)
    if num_items % deal:
        order = np.concatenate([order, np.repeat(order[-1:], deal - num_items % deal)])
    runs = order.reshape(-1, deal)
    padded = samples_per_rank(num_items, world_size, deal) * world_size // deal
    runs = np.resize(runs, (padded, deal))  # whole runs wrap around, as often as fewer than ranks need
    return runs[rank::world_size].reshape(-1).tolist()


def stream_state() -> dict[str, Any]:
    """What a checkpoint keeps of a loader's position besides (epoch, batch): the stream's version."""
    return {"stream": AUGMENTATION["version"]}


def check_stream_state(state: dict[str, Any]) -> None:
    """Refuse to continue a stream another version of fastkd began (it would differ from here on)."""
    if state.get("stream") != AUGMENTATION["version"]:
        from fastkd.errors import CheckpointError

        raise CheckpointError("--resume: the checkpoint was written by a fastkd whose training stream (order or "
                              "augmentation) differs from this one's, so the run cannot continue exactly; start it "
                              "again, or resume it with the fastkd that began it")


def oriented_size(source: bytes | str) -> tuple[int, int]:
    """(width, height) of an image (encoded bytes, or a file's path) as decoded, EXIF orientation
    applied (from the header only)."""
    from pipelines.verify import unlimited_pixels

    with unlimited_pixels(), Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        width, height = image.size
        try:
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception:  # a damaged EXIF block: decoders ignore it too
            orientation = 1
    return (height, width) if orientation in _TRANSPOSED_ORIENTATIONS else (width, height)
