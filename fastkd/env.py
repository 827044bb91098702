"""What a figure was measured on: host, CPU, GPU, library versions and git revision."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch
import torchvision

import fastkd


def dali_version() -> str | None:
    try:
        import nvidia.dali as dali
    except ImportError:
        return None
    return dali.__version__


def git_revision(cwd: Path | None = None) -> str | None:
    folder = cwd or Path(fastkd.__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def device_name(device: torch.device | None = None) -> str:
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {cpu_count()} cores)"


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def collect_env(device: torch.device | None = None) -> dict[str, Any]:
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                         "capability": f"{props.major}.{props.minor}"})
    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device_name(device),
        "gpus": gpus,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "dali": dali_version(),
        "fastkd": fastkd.__version__,
        "git": git_revision(),
    }


def version_text() -> str:
    """`fastkd --version`: what a bug report needs (fastkd and its git revision, the libraries, CUDA)."""
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        cuda = f"CUDA available: yes, {len(names)} GPU(s): {', '.join(dict.fromkeys(names))}"
    else:
        cuda = "CUDA available: no (training runs on the CPU)"
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
    return (f"fastkd {fastkd.__version__} (git {git_revision() or 'unknown: not a git checkout'})\n"
            f"python {platform.python_version()}, torch {torch.__version__} ({build}), "
            f"torchvision {torchvision.__version__}, NVIDIA DALI {dali_version() or 'not installed'}\n{cuda}")
