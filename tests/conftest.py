"""Shared fixtures: small generated datasets and configs, a GPU marker that skips without CUDA."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from fastkd.config import Config, config_from_dict
from fastkd.synth import DemoSpec, generate_demo_dataset

TINY_SPEC = DemoSpec(train_per_class=4, val_per_class=2, min_side=40, max_side=64)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the image-verification cache out of the user's home."""
    os.environ["FASTKD_CACHE_DIR"] = str(tmp_path_factory.mktemp("fastkd-cache"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # the marker, not a parameter id named "gpu"
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_imagefolder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 classes x (4 train + 2 val) JPEGs of 40-64 px."""
    root = tmp_path_factory.mktemp("tiny-imagefolder")
    generate_demo_dataset(root, TINY_SPEC)
    return root


def tiny_config_dict(root: Path, out_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "run": {"name": "tiny", "out_dir": str(out_dir), "seed": 0, "log_every_steps": 2, "tensorboard": False},
        "data": {"root": str(root), "backend": "torchvision", "image_size": 32, "val_resize": 36,
                 "batch_size": 8, "num_workers": 0},
        "model": {"arch": "resnet18"},
        "optim": {"lr": 0.05, "epochs": 2, "warmup_epochs": 1},
        "runtime": {"device": "cpu", "deterministic": True},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def tiny_config(root: Path, out_dir: Path, **sections: dict[str, Any]) -> Config:
    return config_from_dict(tiny_config_dict(root, out_dir, **sections))


REPO = Path(__file__).resolve().parents[1]
HOOKED_FASTKD = str(REPO / "tests" / "fastkd_with_hooks.py")
"""`fastkd` with the test hooks of tests/fastkd_with_hooks.py (run it as a script)."""


def hooked_env(**hooks: str) -> dict[str, str]:
    """Environment for a `fastkd` subprocess: the repository importable, hooks as FASTKD_TEST_*."""
    return {**os.environ, "PYTHONPATH": str(REPO), **{f"FASTKD_TEST_{k.upper()}": v for k, v in hooks.items()}}
