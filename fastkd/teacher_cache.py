"""Teacher cache: the frozen teacher's logits on the exact training crops, recorded once and
replayed by any number of students at student-only cost.

The training stream is a pure function of (seed, epoch, sample) on every backend
(`pipelines.augment`), so the teacher's logits can be keyed by (epoch, sample index): they fit
whatever batch size, number of processes or backend replays them.

On disk, a folder:

    manifest.json      format, what the stream and the teacher were (the key), classes,
                       dtype, and per recorded epoch the sha256 of its file
    epoch-0000.npy     [num_samples, num_classes] logits (fp16 or fp32), row = sample index;
                       or, recorded with top_k = K, [num_samples] rows of (index: K class
                       indices, logit: their K logits and one rest logit), see `encode_top_k`
    epoch-0000-features.npy
                       with features (a run with `distill.feature`): [num_samples, width] of
                       the teacher's pooled pre-logit features, in the logits' dtype

Epoch files are written to a temporary name, flushed and renamed; the manifest is replaced
atomically after each epoch, so a recording killed midway keeps every finished epoch and
resumes at the first missing one. Reading memory-maps the files; before a run starts every
epoch it needs is checked against its size and sha256 (by one process per node), so a
truncated or altered file is an error, never silent garbage. A cache whose key differs from the run's (dataset, seed, image size,
augmentation, teacher checkpoint, precision, classes) is refused with one line naming what
differs. A run needing epochs past the recorded ones is refused before it starts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from fastkd.errors import ConfigError, DataError
from pipelines.base import needs_pinned_memory

FORMAT = "fastkd-teacher-cache-v1"
FEATURES = "pooled pre-logit features"
"""What a cache recorded for feature distillation holds beside the logits (`CacheKey.features`)."""
MANIFEST = "manifest.json"
DTYPES = {"fp16": np.float16, "fp32": np.float32}


def effective_top_k(top_k: int | None, num_classes: int) -> int | None:
    """`top_k`, or None (every logit) when it keeps every class anyway."""
    return None if top_k is None or top_k >= num_classes else top_k


def describe_top_k(top_k: int | None) -> str:
    return "every logit" if top_k is None else f"the top-{top_k} logits"


def row_dtype(num_classes: int, dtype: str, top_k: int | None) -> np.dtype:
    """One sample's row on disk: `num_classes` logits, or a top-k record (packed, no padding)."""
    if top_k is None:
        return np.dtype(DTYPES[dtype])
    index = np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32
    return np.dtype([("index", index, (top_k,)), ("logit", DTYPES[dtype], (top_k + 1,))])


def encode_top_k(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [B, K], logits [B, K+1]) of fp32 `logits` [B, C]: the K largest logits and, last,
    the rest logit `r = log(mean over the other C - K classes of exp(z_c))`.

    Why that one number: the rebuilt logits (`decode_top_k`: the K kept, `r` everywhere else)
    give at T = 1 exactly the teacher's probabilities of the K classes and the exact total
    probability of the others, spread evenly over them (FKD's marginal smoothing); at any other
    temperature the K classes keep their exact ratios and the rest's mass is approximated (its
    logits are replaced by their log-mean-exp). The argmax (the teacher's top-1) is kept."""
    values, indices = logits.topk(top_k, dim=1)
    rest = logits.scatter(1, indices, float("-inf"))
    rest_logit = torch.logsumexp(rest, dim=1, keepdim=True) - math.log(logits.shape[1] - top_k)
    return indices, torch.cat([values, rest_logit], dim=1)


def decode_top_k(indices: torch.Tensor, values: torch.Tensor, num_classes: int) -> torch.Tensor:
    """fp32 logits [B, C] rebuilt from a top-k record: the rest logit everywhere, the K kept in place."""
    values = values.float()
    logits = values[:, -1:].expand(-1, num_classes).clone()
    return logits.scatter_(1, indices.long(), values[:, :-1])


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dataset_digest(files: Sequence[str], labels: Sequence[int], root: Path) -> str:
    """The training list's identity: every file (relative to the data root) with its label, in order."""
    digest = hashlib.sha256()
    for path, label in zip(files, labels):
        try:
            name = os.path.relpath(path, root)
        except ValueError:  # another drive (Windows)
            name = path
        digest.update(f"{name}\t{label}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class CacheKey:
    """Everything the recorded logits depend on: a run replays a cache only if its key is equal."""

    dataset: str
    """sha256 of the training file list with labels (`dataset_digest`)."""
    num_samples: int
    classes: list[str]
    seed: int
    image_size: int | dict[str, int]
    """The side of the crops the teacher saw, or the numbers of their size schedule."""
    augmentation: dict[str, Any]
    teacher_arch: str
    teacher_checkpoint: str
    """sha256 of the teacher's checkpoint file."""
    teacher_precision: str
    teacher_normalization: dict[str, list[float]] | None = None
    """The teacher's input mean/std when not ImageNet's (null: ImageNet's, as every cache before it)."""
    features: str | None = None
    """What the cache holds beside the logits: `FEATURES` (the teacher's pooled pre-logit features), or null."""

    def difference(self, other: "CacheKey", *, replay: bool = False) -> str | None:
        """What differs from `other` (the run's key), in words, or None. A `replay` may leave out
        features the cache holds (a recording extends a cache only with what it holds)."""
        for name, mine in asdict(self).items():
            theirs = getattr(other, name)
            if mine == theirs or (name == "features" and replay and theirs is None):
                continue
            if name == "features":
                if mine is None and replay:
                    return ("the teacher's pooled features were not recorded, and distill.feature needs them (record "
                            "a cache with distill.feature set)")
                return (f"it was recorded {'without' if mine is None else 'with'} the teacher's pooled features, this "
                        f"recording {'with' if mine is None else 'without'} (distill.feature as when it was recorded, "
                        "or another folder)")
            if name in ("dataset", "teacher_checkpoint"):
                what = "training file list" if name == "dataset" else "teacher checkpoint"
                return f"the {what} differs (sha256 {mine[:12]}... recorded, {theirs[:12]}... now)"
            if name == "classes":
                return f"the class list differs ({len(mine)} classes recorded, {len(theirs)} now)"
            if name == "augmentation":
                return f"the augmentation differs: {_describe_difference(mine, theirs)}"
            return f"{name} differs ({mine} recorded, {theirs} now)"
        return None


def _describe_difference(recorded: dict[str, Any], now: dict[str, Any]) -> str:
    """The keys of two augmentation descriptions whose values differ, with both values."""
    parts = []
    for key in sorted(set(recorded) | set(now), key=lambda k: (k not in recorded, k)):
        mine, theirs = recorded.get(key, "none"), now.get(key, "none")
        if mine != theirs:
            parts.append(f"{key} {json.dumps(mine)} recorded, {json.dumps(theirs)} now")
    return "; ".join(parts)


class TeacherCache:
    """A cache folder: recorded epochs read memory-mapped, new epochs written atomically."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest
        self.key = CacheKey(**manifest["key"])
        self._arrays: dict[tuple[int, str], np.ndarray] = {}

    # -- opening ----------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, key: CacheKey, *, epochs: int, verify: bool = True,
             source: str = "distill.teacher_cache", top_k: int | None = None) -> "TeacherCache":
        """The cache at `path` for a run with `key` that needs epochs 0..epochs-1; errors name it.

        With `verify` every needed epoch file's size and sha256 are checked now, before the run
        writes anything (one process per node does it: the files are the same for all)."""
        manifest = _read_manifest(path, source)
        cache = cls(path, manifest)
        different = cache.key.difference(key, replay=True)
        if different:
            raise ConfigError(f"{source}: {path} was recorded for another run: {different}")
        if cache.top_k != top_k:
            raise ConfigError(f"{source}: {path} holds {describe_top_k(cache.top_k)} of the teacher, the run expects "
                              f"{describe_top_k(top_k)} (distill.teacher_cache_top_k: {top_k or 'null'}); set "
                              f"distill.teacher_cache_top_k={cache.top_k or 'null'} to replay it")
        missing = [e for e in range(epochs) if e not in cache.recorded_epochs]
        if missing:
            raise ConfigError(f"{source}: {path} holds {cache.describe_epochs()}, the run needs epochs 0-{epochs - 1} "
                              f"(record them with `fastkd teacher-cache --config ... --epochs {epochs}`)")
        for epoch in range(epochs):
            cache.epoch_logits(epoch, verify=verify)
            if key.features is not None:
                cache.epoch_features(epoch, verify=verify)
        return cache

    @property
    def digest(self) -> str:
        """Identity of the recorded logits (dtype and every epoch's sha256): a resumed run checks
        it is replaying the cache it started with."""
        return hashlib.sha256(json.dumps([self.manifest["dtype"], self.manifest["epochs"]],
                                         sort_keys=True).encode()).hexdigest()

    @classmethod
    def create_or_resume(cls, path: Path, key: CacheKey, *, num_classes: int, dtype: str,
                         teacher_val: dict[str, float], recorded_with: dict[str, Any] | None = None,
                         top_k: int | None = None, feature_width: int | None = None) -> "TeacherCache":
        """For recording (by one process: rank 0 under torchrun): a new cache, or the partly
        recorded one at `path` if its key matches; `feature_width`: the teacher's pooled features'
        width when the key records features."""
        assert (key.features is None) == (feature_width is None), "features need their width, and only they"
        manifest = json.loads(json.dumps({
            "format": FORMAT, "key": asdict(key), "num_classes": num_classes, "dtype": dtype, "top_k": top_k,
            **({"feature_width": feature_width} if feature_width is not None else {}),
            "teacher_val": teacher_val, "recorded_with": recorded_with or {}, "epochs": {}}))  # as the file holds it
        if (path / MANIFEST).is_file():
            cache = cls(path, _read_manifest(path, "teacher-cache"))
            if not cache.recorded_epochs and cache.manifest != manifest:
                # A first attempt was refused before any epoch: start afresh with this one's teacher
                # and dtype (its manifest replaced at once; epoch files it never listed go).
                cache.remove_stale_files()
                for unlisted in path.glob("epoch-*.npy"):
                    unlisted.unlink()
                cache = cls(path, manifest)
                cache.write_manifest()
                return cache
            different = cache.key.difference(key)
            if different:
                raise ConfigError(f"distill.teacher_cache: {path} holds a cache of another run ({different}); "
                                  "choose another folder or delete it")
            if cache.manifest["dtype"] != dtype:
                raise ConfigError(f"--dtype: {path} was recorded in {cache.manifest['dtype']}, not {dtype} "
                                  f"({cache.describe_epochs()}); delete it to record it again in {dtype}")
            if cache.top_k != top_k:
                raise ConfigError(f"--top-k: {path} holds {describe_top_k(cache.top_k)} ({cache.describe_epochs()}), "
                                  f"not {describe_top_k(top_k)}; record into another folder, or delete it")
            return cache
        if path.exists() and any(path.iterdir()):
            raise ConfigError(f"distill.teacher_cache: {path} exists and is not a teacher cache")
        path.mkdir(parents=True, exist_ok=True)
        cache = cls(path, manifest)
        cache.write_manifest()
        return cache

    # -- reading ----------------------------------------------------------------------

    @property
    def top_k(self) -> int | None:
        """K of a top-k cache; None when it holds every logit (caches recorded before top-k existed too)."""
        return self.manifest.get("top_k")

    @property
    def feature_width(self) -> int | None:
        """The width of the recorded pooled features; None when the cache holds logits only."""
        return self.manifest.get("feature_width")

    @property
    def row_dtype(self) -> np.dtype:
        return row_dtype(self.manifest["num_classes"], self.manifest["dtype"], self.top_k)

    @property
    def file_shape(self) -> tuple[int, ...]:
        rows = self.key.num_samples
        return (rows, self.manifest["num_classes"]) if self.top_k is None else (rows,)

    @property
    def recorded_epochs(self) -> list[int]:
        return sorted(int(e) for e in self.manifest["epochs"])

    def describe_epochs(self) -> str:
        epochs = self.recorded_epochs
        if not epochs:
            return "no recorded epoch"
        if epochs == list(range(epochs[-1] + 1)):
            return f"epochs 0-{epochs[-1]}"
        return "epochs " + ", ".join(map(str, epochs))

    def epoch_path(self, epoch: int, kind: str = "logits") -> Path:
        """An epoch's file of logits, or of `kind` "features"."""
        return self.path / f"epoch-{epoch:04d}{'' if kind == 'logits' else '-' + kind}.npy"

    def _layout(self, kind: str) -> tuple[tuple[int, ...], np.dtype]:
        if kind == "logits":
            return self.file_shape, self.row_dtype
        assert self.feature_width is not None
        return (self.key.num_samples, self.feature_width), np.dtype(DTYPES[self.manifest["dtype"]])

    def _epoch_array(self, epoch: int, kind: str, verify: bool) -> np.ndarray:
        """The memory-mapped file of one recorded epoch, checked when first opened (its size
        always, its sha256 with `verify`)."""
        if (epoch, kind) not in self._arrays:
            entry = self.manifest["epochs"].get(str(epoch))
            path = self.epoch_path(epoch, kind)
            if entry is None:
                raise DataError(f"teacher cache {self.path}: epoch {epoch} was not recorded ({self.describe_epochs()})")
            entry = entry if kind == "logits" else entry.get(kind)
            if (entry is None or not path.is_file() or path.stat().st_size != entry["bytes"]
                    or (verify and file_sha256(path) != entry["sha256"])):
                raise DataError(f"teacher cache {self.path}: {path.name} is missing, truncated or altered "
                                "(its size or sha256 differs from the manifest); record that epoch again")
            array = np.load(path, mmap_mode="r")
            shape, dtype = self._layout(kind)
            if array.shape != shape or array.dtype != dtype:
                raise DataError(f"teacher cache {self.path}: {path.name} holds {array.dtype} {array.shape}, "
                                f"expected {dtype} {shape}")
            self._arrays[(epoch, kind)] = array
        return self._arrays[(epoch, kind)]

    def epoch_logits(self, epoch: int, *, verify: bool = True) -> np.ndarray:
        """The memory-mapped logits of one recorded epoch (`_epoch_array`)."""
        return self._epoch_array(epoch, "logits", verify)

    def epoch_features(self, epoch: int, *, verify: bool = True) -> np.ndarray:
        """The memory-mapped pooled features of one recorded epoch (`_epoch_array`)."""
        return self._epoch_array(epoch, "features", verify)

    def advise_reading(self, epoch: int) -> None:
        """Ask the kernel to read an epoch file into the page cache in the background
        (posix_fadvise WILLNEED; nothing where the platform lacks it): a replay's random rows
        are then memory reads, not one disk read per row, from the epoch's first batches on."""
        if str(epoch) not in self.manifest["epochs"] or not hasattr(os, "posix_fadvise"):
            return
        for kind in self.kinds:
            try:
                fd = os.open(self.epoch_path(epoch, kind), os.O_RDONLY)
            except OSError:
                continue  # checked when opened for reading; advice only
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    @property
    def kinds(self) -> tuple[str, ...]:
        """The files an epoch has: its logits, and its features when the cache holds them."""
        return ("logits",) if self.feature_width is None else ("logits", "features")

    def rows(self, epoch: int, indices: np.ndarray) -> np.ndarray:
        """[len(indices), C] logits of those samples (a top-k cache's rebuilt, in fp32)."""
        rows = np.asarray(self.epoch_logits(epoch)[indices])
        if self.top_k is None:
            return rows
        return decode_top_k(torch.from_numpy(np.ascontiguousarray(rows["index"])),
                            torch.from_numpy(np.ascontiguousarray(rows["logit"])), self.manifest["num_classes"]).numpy()

    # -- writing ----------------------------------------------------------------------

    def temp_epoch_path(self, epoch: int, kind: str = "logits") -> Path:
        return self.path / f".{self.epoch_path(epoch, kind).name}.tmp"

    def new_epoch_file(self, epoch: int, kind: str = "logits") -> np.memmap:
        """A zeroed memory-mapped file for one epoch's rows (of logits or features), under a temporary name."""
        shape, dtype = self._layout(kind)
        return np.lib.format.open_memmap(self.temp_epoch_path(epoch, kind), mode="w+", dtype=dtype, shape=shape)

    def write_features(self, rows: np.memmap, index: np.ndarray, features: torch.Tensor) -> None:
        """Store fp32 pooled `features` [B, width] of samples `index` in an epoch's features file."""
        rows[index] = features.cpu().numpy()  # host sync: recording, not training

    def write_rows(self, rows: np.memmap, index: np.ndarray, logits: torch.Tensor) -> None:
        """Store fp32 `logits` [B, C] of samples `index` in an epoch file of this cache's kind."""
        if self.top_k is None:
            rows[index] = logits.cpu().numpy()  # host sync: recording, not training
            return
        indices, values = encode_top_k(logits, self.top_k)
        rows["index"][index] = indices.cpu().numpy()
        rows["logit"][index] = values.cpu().numpy()

    def commit_epoch(self, epoch: int) -> None:
        """Make an epoch's fully written temporary files (logits, and features when the cache holds
        them) the recorded ones: fsync, rename, then the manifest lists the epoch."""
        entry: dict[str, Any] = {}
        for kind in self.kinds:
            tmp = self.temp_epoch_path(epoch, kind)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            final = self.epoch_path(epoch, kind)
            os.replace(tmp, final)
            record = {"sha256": file_sha256(final), "bytes": final.stat().st_size}
            entry.update(record) if kind == "logits" else entry.update({kind: record})
        self.manifest["epochs"][str(epoch)] = entry
        self.write_manifest()

    def write_manifest(self) -> None:
        tmp = self.path / f".{MANIFEST}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(self.manifest, indent=2) + "\n")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path / MANIFEST)

    def remove_stale_files(self) -> None:
        for stale in self.path.glob(".*.tmp*"):
            stale.unlink(missing_ok=True)


def _read_manifest(path: Path, source: str) -> dict[str, Any]:
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ConfigError(f"{source}: no teacher cache at {path} (no {MANIFEST}; record one with "
                          "`fastkd teacher-cache --config ...`)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"teacher cache {path}: {MANIFEST} is unreadable or corrupt ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"teacher cache {path}: {MANIFEST} is not a {FORMAT} manifest")
    return manifest


class CachedTeacher:
    """The step's view of a cache: logits (and, with `features`, pooled features) of the current
    epoch's samples, on the device.

    Rows are gathered on the host into pinned memory and copied without blocking (PyTorch's
    pinned-memory cache keeps each buffer until its copy has run).
    """

    def __init__(self, cache: TeacherCache, device: torch.device, *, features: bool = False):
        if features and cache.feature_width is None:
            raise ConfigError(f"distill.teacher_cache: {cache.path} holds no pooled features (record it with "
                              "distill.feature set)")
        self.cache = cache
        self.device = device
        self.features = features
        self.epoch = 0
        row = cache.row_dtype
        if cache.top_k is not None:  # a top-k row's layout, worked out once
            fields = row.fields
            assert fields is not None, "a top-k row is a record"
            self._split = fields["logit"][1]  # the byte offset of its logits
            self._index_dtype = torch.from_numpy(np.zeros(0, fields["index"][0].base)).dtype
            self._value_dtype = torch.from_numpy(np.zeros(0, fields["logit"][0].base)).dtype
        # plain rows (every logit, features): the cache's dtype
        self._plain_dtype = torch.from_numpy(np.zeros(0, DTYPES[cache.manifest["dtype"]])).dtype

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for upcoming in (epoch, epoch + 1):  # this epoch's file, and the next one's while this one trains
            self.cache.advise_reading(upcoming)

    def __call__(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The logits of these samples in the current epoch and, with `features`, their pooled features."""
        index = indices.numpy()
        features = self._gather(self.cache.epoch_features(self.epoch), index) if self.features else None
        return self._logits(index), features

    def _gather(self, rows: np.ndarray, index: np.ndarray) -> torch.Tensor:
        """Plain rows (every logit, or features) of `index`, on the device."""
        # mode="clip" (the loader's indices are in range): numpy's default "raise" gathers through a
        # temporary copy of the rows, even into `out`.
        if not needs_pinned_memory(self.device):
            return torch.from_numpy(np.take(rows, index, axis=0))
        pinned = torch.empty((len(index), rows.shape[1]), dtype=self._plain_dtype, pin_memory=True)
        np.take(rows, index, axis=0, out=pinned.numpy(), mode="clip")  # straight into pinned memory
        return pinned.to(self.device, non_blocking=True)

    def _logits(self, index: np.ndarray) -> torch.Tensor:
        logits = self.cache.epoch_logits(self.epoch)
        top_k = self.cache.top_k
        if top_k is None:
            return self._gather(logits, index)
        pin = needs_pinned_memory(self.device)
        # A top-k record is gathered as raw bytes (pinned on a GPU), copied, then split into its
        # index and logit fields and rebuilt into [B, C] logits on the device.
        row = logits.dtype
        raw = torch.empty((len(index), row.itemsize), dtype=torch.uint8, pin_memory=pin)
        np.take(logits, index, axis=0, out=raw.numpy().view(row).reshape(len(index)), mode="clip")
        raw = raw.to(self.device, non_blocking=True)
        # the fields as their own dtypes (a view needs each row's bytes of a field to be contiguous: small copies)
        top = raw[:, :self._split].contiguous().view(self._index_dtype)
        values = raw[:, self._split:].contiguous().view(self._value_dtype)
        return decode_top_k(top, values, self.cache.manifest["num_classes"])
