"""Shared fixtures and helpers: small generated datasets, configs and a teacher; the CLI run in and
out of process; a GPU marker that skips without CUDA. Test files import helpers from here only,
never from one another."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
import yaml

from fastkd.config import Config, DataConfig, config_from_dict
from fastkd.synth import DemoSpec, generate_demo_dataset
from pipelines.base import Batch, BatchSpec

TINY_SPEC = DemoSpec(train_per_class=4, val_per_class=2, min_side=40, max_side=64)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the image-verification cache out of the user's home."""
    os.environ["FASTKD_CACHE_DIR"] = str(tmp_path_factory.mktemp("fastkd-cache"))


@pytest.fixture(autouse=True)
def torch_threads_restored() -> Iterator[None]:
    """A run built with `runtime.threads` sets the process's torch threads: the next test starts
    with the count this one started with."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


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


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "fastkd", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def cli_error(capsys, *args: str) -> str:
    """`fastkd ARGS` in this process, refused: its one-line error (exit status 2, no traceback)."""
    from fastkd.cli import main  # imported when used: subprocesses that import this file start faster

    with pytest.raises(SystemExit) as info:
        main(list(args))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def stop_after(monkeypatch, step: int) -> None:
    """Make the loop see a stop request (as from SIGTERM) right after optimizer step `step`."""
    from fastkd import loop

    original = loop.agree_to_stop

    def fake(t):
        if t.state.step == step:
            t.stop.signum = 15
        return original(t)

    monkeypatch.setattr(loop, "agree_to_stop", fake)


@pytest.fixture(scope="session")
def tiny_teacher(tiny_imagefolder, tmp_path_factory) -> Path:
    """best.pt of a short `fastkd train` run on the tiny dataset (barely trained: near chance)."""
    from fastkd import commands

    out = tmp_path_factory.mktemp("teacher-runs")
    result = commands.train(tiny_config(tiny_imagefolder, out, run={"name": "teacher"}), progress=False)
    return result.run_dir / "best.pt"


def distill_dict(root: Path, out: Path, teacher: Path, **distill) -> dict:
    raw = tiny_config_dict(root, out, model={"arch": "shufflenet_v2_x0_5"})
    raw["distill"] = {"teacher": {"arch": "resnet18", "checkpoint": str(teacher)}, "alpha": 0.6,
                      "temperature": 3.0, "allow_weak_teacher": True, **distill}
    return raw


CPU = BatchSpec(device=torch.device("cpu"), dtype=torch.float32)
GPU_SPEC = BatchSpec(device=torch.device("cuda", 0), dtype=torch.float16)
"""A GPU batch spec, for graphs built (not run) without a GPU."""


def pairs(loader: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) of each batch a loader yields."""
    for batch in loader:
        yield batch.images, batch.labels


def batch_of(images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor | None = None, **fields) -> Batch:
    """A training batch of these images and labels (indices 0..B-1 unless given)."""
    return Batch(images, labels, torch.arange(labels.shape[0]) if indices is None else indices, **fields)


def backend_data(backend: str, **dali: Any) -> dict[str, Any]:
    """A data section's backend keys: DALI decoding on the CPU (with `dali`'s other settings)."""
    return {"backend": backend, **({"dali": {"device": "cpu", **dali}} if backend == "dali" else {})}


def data_config(root: Path, backend: str, *, dali: dict[str, Any] | None = None, **kw) -> DataConfig:
    """A small data section of `backend` (DALI decoding on the CPU unless `dali` says otherwise;
    10 classes of synthetic batches), with `kw` as data keys (sections as dicts)."""
    raw = dict(root=str(root), **backend_data(backend, **(dali or {})), image_size=32, val_resize=36, batch_size=7,
               num_workers=1, **({"synthetic": {"num_classes": 10, "train_samples": 40, "val_samples": 20}}
                                 if backend == "synthetic" else {}))
    raw.update(kw)
    return config_from_dict({"data": raw}).data


def require_backend(backend: str) -> None:
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 180) -> None:
    """Until `path` exists; fails when `process` exits first (with its output) or after
    `timeout` seconds (a hang, with room for a loaded machine)."""
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, f"{path} did not appear within {timeout:.0f} s"
        time.sleep(0.05)
