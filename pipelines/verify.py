"""Find images that cannot be decoded, before they can stop a run in the middle of an epoch.

Every image is decoded in full with PIL (in parallel), as the torchvision backend would; the
outcome per file is cached under `~/.cache/fastkd/verified/` (or `$FASTKD_CACHE_DIR`) keyed by
path, size and modification time, so a dataset is decoded once, not at every start.
Valid-but-unusual files (grayscale, CMYK, progressive, PNG content named .jpg, tiny or huge
images) pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

if TYPE_CHECKING:
    from pipelines.datasets import Dataset


@dataclass(frozen=True)
class BrokenImage:
    path: str
    reason: str


@contextlib.contextmanager
def unlimited_pixels() -> Iterator[None]:
    """Lift PIL's decompression-bomb limit for fastkd's own decoding only (huge images are valid
    data here), restoring whatever limit the process had."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def image_problem(path: str) -> str | None:
    """Why `path` cannot be decoded to RGB, or None when it can."""
    with unlimited_pixels():
        return _decode_problem(path)


def _decode_problem(path: str) -> str | None:
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with Image.open(path) as image:
            ImageOps.exif_transpose(image).convert("RGB").load()
    except UnidentifiedImageError:
        return "not an image, or an unsupported format"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        text = str(exc).strip() or type(exc).__name__
        return "truncated" if "truncated" in text else text
    return None


def _check(path: str) -> tuple[str, str | None]:
    return path, image_problem(path)


def _cache_file(root: Path) -> Path:
    base = Path(os.environ.get("FASTKD_CACHE_DIR", Path.home() / ".cache" / "fastkd")) / "verified"
    return base / (hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16] + ".json")


def _signature(path: str) -> list[int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def find_broken_images(files: Sequence[str], *, root: Path, workers: int, progress: bool = True,
                       use_cache: bool = True) -> list[BrokenImage]:
    """Decode every file (cached results reused); return those that fail, in input order."""
    cache_path = _cache_file(root)
    cache: dict[str, list] = {}
    if use_cache and cache_path.is_file():
        try:
            cache = json.loads(cache_path.read_text())
        except ValueError:
            cache = {}
    results: dict[str, str | None] = {}
    todo = []
    for path in files:
        entry = cache.get(path)
        if entry is not None and entry[:2] == _signature(path):
            results[path] = entry[2]
        else:
            todo.append(path)
    if todo:
        bar = tqdm(total=len(todo), desc="checking images", unit="img", disable=None if progress else True)
        for path, problem in _map(todo, workers):
            results[path] = problem
            bar.update(1)
        bar.close()
        if use_cache:
            cache.update({p: [*(_signature(p) or [0, 0]), results[p]] for p in todo})
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_path.with_name(f".{cache_path.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(cache))
            tmp.replace(cache_path)
    return [BrokenImage(p, results[p]) for p in files if results[p] is not None]  # type: ignore[arg-type]


def _map(paths: list[str], workers: int) -> Iterable[tuple[str, str | None]]:
    if workers <= 1 or len(paths) < 64:
        yield from map(_check, paths)
        return
    context = multiprocessing.get_context("forkserver" if "forkserver" in multiprocessing.get_all_start_methods()
                                          else "spawn")
    with context.Pool(workers) as pool:
        yield from pool.imap_unordered(_check, paths, chunksize=16)


def write_clean_lists(dataset: "Dataset", broken: Sequence[BrokenImage], root: Path, out: Path) -> list[Path]:
    """`filelist` data without the broken files: OUT (train), OUT's `.val` twin and `.classes` file.

    Paths are written relative to `root`, so the lists work with `data.format: filelist` and
    `data.root: ROOT` wherever the lists themselves live.
    """
    drop = {item.path for item in broken}
    val_out = out.with_name(f"{out.stem}.val{out.suffix or '.txt'}")
    classes_out = out.with_name(f"{out.stem}.classes{out.suffix or '.txt'}")
    for target, split in ((out, dataset.train), (val_out, dataset.val)):
        lines = [f"{os.path.relpath(f, root)} {y}" for f, y in zip(split.files, split.labels) if f not in drop]
        target.write_text("".join(line + "\n" for line in lines))
    classes_out.write_text("".join(name + "\n" for name in dataset.classes))
    return [out, val_out, classes_out]
