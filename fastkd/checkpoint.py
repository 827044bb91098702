"""Checkpoints: written atomically (temp file, fsync, rename), read with one-line errors.

A checkpoint is a dict of tensors and plain values only, so it loads with
`torch.load(weights_only=True)`: opening a checkpoint never runs code from it.
`model` is a plain state_dict that `torchvision.models.<arch>(num_classes=N)` loads strictly.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from fastkd.errors import CheckpointError

FORMAT = "fastkd-checkpoint-v1"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` to `path` so that a crash at any moment leaves the old file or the new one."""
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        previous = "; the previous checkpoint is intact" if path.exists() else ""
        raise CheckpointError(f"could not write checkpoint {path}: {exc.strerror or exc}{previous}") from None


def copy_checkpoint(source: Path, target: Path) -> None:
    """Atomically replace `target` with a copy of `source` (best.pt from last.pt)."""
    tmp = _temp_path(target)
    try:
        shutil.copyfile(source, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not write checkpoint {target}: {exc.strerror or exc}") from None


def load_checkpoint(path: Path, *, map_location: str | torch.device = "cpu", key: str | None = None
                    ) -> dict[str, Any]:
    """Read any checkpoint file (fastkd's or a plain state_dict); errors name the path, and the
    config key or argument that named it when `key` says which."""
    prefix = f"{key}: " if key else ""
    if not path.exists():
        raise CheckpointError(f"{prefix}checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"{prefix}checkpoint is not a file: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except PermissionError:
        raise CheckpointError(f"{prefix}checkpoint not readable (permission denied): {path}") from None
    except Exception as exc:  # a damaged file fails inside the unpickler in many different ways
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if len(reason) > 160:
            reason = reason[:160].rsplit(" ", 1)[0] + " ..."
        raise CheckpointError(f"{prefix}checkpoint is corrupt, truncated or not a PyTorch file: {path} "
                              f"({reason})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{prefix}checkpoint holds a {type(payload).__name__}, not a state_dict: {path}")
    return payload


def is_fastkd_checkpoint(payload: dict[str, Any]) -> bool:
    return payload.get("format") == FORMAT
