"""The built-in demo dataset: deterministic JPEGs in ImageFolder layout, with class structure.

Each class is a (shape, colour family) pair: 5 shapes x 2 colour families = 10 classes. The
class object sits at a random place, size and rotation on a cluttered, noisy background among
smaller distractor shapes. Classes resemble each other in graded ways, which is what makes a
teacher's soft labels informative: the two colour families overlap in hue (warm_disc is
sometimes confused with cool_disc), and shapes come in look-alike pairs (disc/ring,
square/cross, triangle/square), so a small CNN learns it well above chance but not perfectly.
Images are ImageNet-sized (sides 300-500 px) JPEGs at quality 90.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fastkd.errors import DataError
from fastkd.log import log

SHAPES = ("disc", "ring", "square", "cross", "triangle")
FAMILIES = {"warm": 35.0, "cool": 75.0}  # hue centres in degrees; spread below makes them overlap
HUE_SPREAD = 22.0
MARKER = "fastkd-demo.json"


@dataclass(frozen=True)
class DemoSpec:
    train_per_class: int = 100
    val_per_class: int = 30
    min_side: int = 300
    max_side: int = 500
    quality: int = 90
    seed: int = 0
    version: int = 1

    @property
    def classes(self) -> list[str]:
        return [f"{family}_{shape}" for family in FAMILIES for shape in SHAPES]


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    h = (h % 360.0) / 60.0
    c = v * s
    x = c * (1 - abs(h % 2 - 1))
    r, g, b = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h) % 6]
    m = v - c
    return tuple(int(round(255 * (u + m))) for u in (r, g, b))  # type: ignore[return-value]


def _shape_polygons(shape: str, cx: float, cy: float, r: float, angle: float) -> list[list[tuple[float, float]]]:
    def rotate(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        ca, sa = math.cos(angle), math.sin(angle)
        return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in points]

    if shape == "square":
        return [rotate([(-r, -r), (r, -r), (r, r), (-r, r)])]
    if shape == "triangle":
        return [rotate([(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])]
    if shape == "cross":
        w = r * 0.38
        return [rotate([(-r, -w), (r, -w), (r, w), (-r, w)]), rotate([(-w, -r), (w, -r), (w, r), (-w, r)])]
    raise ValueError(shape)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float,
                colour: tuple[int, int, int], background: Any) -> None:
    if shape in ("disc", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        if shape == "ring":
            inner = r * 0.55
            draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=background)
        return
    for polygon in _shape_polygons(shape, cx, cy, r, angle):
        draw.polygon(polygon, fill=colour)


def render_image(spec: DemoSpec, label: int, rng: np.random.Generator) -> Image.Image:
    family, shape = spec.classes[label].split("_")
    width, height = (int(v) for v in rng.integers(spec.min_side, spec.max_side + 1, size=2))
    # Background: a smooth random colour field plus pixel noise.
    grey = rng.uniform(70, 190, size=(4, 4, 1))
    coarse = (0.6 * grey + 0.4 * rng.uniform(40, 215, size=(4, 4, 3))).astype(np.uint8)
    background = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    image = background.copy()
    draw = ImageDraw.Draw(image)
    short = min(width, height)
    # Distractors: smaller, desaturated shapes of any kind.
    for _ in range(int(rng.integers(1, 4))):
        r = short * rng.uniform(0.04, 0.10)
        colour = _hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0.0, 0.35), rng.uniform(0.3, 0.95))
        _draw_shape(draw, SHAPES[int(rng.integers(len(SHAPES)))], rng.uniform(r, width - r),
                    rng.uniform(r, height - r), r, rng.uniform(0, 2 * math.pi), colour,
                    background.getpixel((0, 0)))
    # The class object.
    r = short * rng.uniform(0.22, 0.40)
    cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
    hue = rng.normal(FAMILIES[family], HUE_SPREAD)
    colour = _hsv_to_rgb(hue, rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))
    ring_fill = background.getpixel((int(cx), int(cy)))
    _draw_shape(draw, shape, cx, cy, r, rng.uniform(0, 2 * math.pi), colour, ring_fill)
    image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.0, 1.5))))
    noisy = np.asarray(image, dtype=np.int16) + rng.normal(0, 10, size=(height, width, 3)).astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _write_image(spec: DemoSpec, folder: Path, split_id: int, label: int, index: int) -> None:
    rng = np.random.default_rng([spec.seed, spec.version, split_id, label, index])
    image = render_image(spec, label, rng)
    image.save(folder / f"{spec.classes[label]}_{index:04d}.jpg", quality=spec.quality)


def generate_demo_dataset(out: Path, spec: DemoSpec = DemoSpec(), workers: int | None = None) -> None:
    """Write `out/train/<class>/*.jpg` and `out/val/<class>/*.jpg`; the same bytes every time
    (each image has its own seed), with `workers` processes (default: one per core)."""
    from concurrent.futures import ProcessPoolExecutor

    from fastkd.env import cpu_count

    jobs = []
    for split, per_class, split_id in (("train", spec.train_per_class, 0), ("val", spec.val_per_class, 1)):
        for label, name in enumerate(spec.classes):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            jobs += [(spec, folder, split_id, label, index) for index in range(per_class)]
    workers = max(1, workers or cpu_count())
    if workers == 1:
        for job in jobs:
            _write_image(*job)
    else:
        with ProcessPoolExecutor(workers) as pool:
            for _ in pool.map(_write_image, *zip(*jobs), chunksize=16):
                pass
    (out / MARKER).write_text(json.dumps(asdict(spec), indent=2) + "\n")


def ensure_demo_dataset(root: Path, spec: DemoSpec = DemoSpec()) -> bool:
    """Generate the demo dataset into `root` unless it is already there. Returns True if generated.

    Generation goes to a temporary sibling folder renamed into place at the end, so an
    interrupted generation never leaves a half-written dataset that looks complete.
    """
    marker = root / MARKER
    if marker.is_file():
        if json.loads(marker.read_text()) != asdict(spec):
            raise DataError(f"{root} holds a demo dataset of another version; delete it to regenerate")
        return False
    if root.exists() and any(root.iterdir()):
        raise DataError(f"data.root exists but is not a fastkd demo dataset: {root} (data.generate_demo "
                        "only writes into a missing or empty folder)")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info(f"generating the demo dataset into {root} ...")
    generate_demo_dataset(tmp, spec)
    if root.exists():
        root.rmdir()
    os.replace(tmp, root)
    return True
