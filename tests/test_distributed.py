"""torchrun on the CPU (gloo): two processes train and distil, shard the data, resume exactly."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

from fastkd.checkpoint import load_checkpoint
from fastkd.config import config_from_dict
from fastkd.data import build_loaders
from pipelines.base import Shard
from tests.conftest import (CPU, HOOKED_FASTKD, REPO, backend_data, distill_dict, hooked_env, tiny_config_dict, wait_for,
                            write_config)

pytestmark = pytest.mark.slow


def torchrun_command(*args: str, hooks: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """Two processes of `fastkd` (with tests/fastkd_with_hooks.py's hooks when any are given)."""
    env = hooked_env(**(hooks or {}))
    program = [HOOKED_FASTKD] if hooks else ["-m", "fastkd"]
    return ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *program, *args,
             "--no-progress"], env)


def torchrun(*args: str, timeout: float = 300, hooks: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command, env = torchrun_command(*args, hooks=hooks)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def backend_section(backend: str) -> dict:
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    return {**backend_data(backend), "batch_size": 4, "num_workers": 1}


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_two_process_training_counts_every_val_image_once(tiny_imagefolder, tmp_path, backend):
    raw = tiny_config_dict(tiny_imagefolder, tmp_path / "runs", data=backend_section(backend))
    done = torchrun("train", "--config", str(write_config(tmp_path / "c.yaml", raw)))
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 8
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]  # rank 0 alone writes: no duplicated lines
    assert all(r["val_images"] == 20 for r in records)
    assert records[-1]["step"] == 2 * 5  # 40 images / (2 ranks x 4) = 5 steps per epoch
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(load_checkpoint(run_dir / "best.pt")["model"], strict=True)
    assert done.stdout.count("run ") == 1  # one summary line, from rank 0


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_two_process_distillation_completes(tiny_imagefolder, tiny_teacher, tmp_path, backend):  # noqa: F811
    raw = distill_dict(tiny_imagefolder, tmp_path / "runs", tiny_teacher)
    raw["data"].update(backend_section(backend))
    done = torchrun("distill", "--config", str(write_config(tmp_path / "kd.yaml", raw)))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["teacher"]["arch"] == "resnet18"
    assert not any(k.startswith("module.") for k in load_checkpoint(tmp_path / "runs" / "tiny" / "last.pt")["model"])


def unique_label_dataset(root: Path, count: int) -> Path:
    """One image per class, so a label identifies its sample."""
    for split in ("train", "val"):
        for i in range(count):
            folder = root / split / f"c{i:02d}"
            folder.mkdir(parents=True)
            Image.new("RGB", (40, 30), (i * 10 % 255, 80, 160)).save(folder / "x.jpg")
    return root


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_shards_are_disjoint_and_cover_the_data(tmp_path, backend):
    section = backend_section(backend)
    root = unique_label_dataset(tmp_path / "data", 23)
    # Every sample is dealt once: the partial last batch is kept (drop_last would leave it out).
    cfg = config_from_dict({"data": {"root": str(root), "image_size": 16, "val_resize": 16, **section, "batch_size": 5,
                                     "drop_last": False}}).data
    train, val = [], []
    for rank in range(2):
        loaders = build_loaders(cfg, spec=CPU, seed=0, shard=Shard(rank=rank, world_size=2))
        train.append([y for batch in loaders.train for y in batch.labels.tolist()])
        val.append([y for batch in loaders.val for y in batch.labels.tolist()])
        assert len(loaders.train) == 3  # equal steps on every rank
        assert loaders.val.num_samples == len(val[-1]) and len(loaders.val) == -(-len(val[-1]) // 5)  # its own count
    assert set(train[0]) | set(train[1]) == set(range(23))
    assert len(set(train[0]) & set(train[1])) <= 1  # only padding may repeat a sample
    assert sorted(val[0] + val[1]) == list(range(23))  # every val image exactly once
    # With drop_last (the default) each rank's 12 dealt samples make 2 full batches, equal on every rank,
    # and the shards stay disjoint but for padding.
    full = config_from_dict({"data": {"root": str(root), "image_size": 16, "val_resize": 16, **section,
                                      "batch_size": 5}}).data
    kept = []
    for rank in range(2):
        loader = build_loaders(full, spec=CPU, seed=0, shard=Shard(rank=rank, world_size=2)).train
        sizes = [len(batch.labels) for batch in loader]
        assert len(loader) == 2 and sizes == [5, 5]
        kept.append({y for batch in loader for y in batch.labels.tolist()})
    assert len(kept[0] & kept[1]) <= 1  # only padding may repeat a sample


def same_weights(a: Path, b: Path) -> bool:
    first, second = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_sigterm_then_resume_under_torchrun_matches_an_uninterrupted_run(tiny_imagefolder, tmp_path):
    raw = tiny_config_dict(tiny_imagefolder, tmp_path / "runs", data=backend_section("torchvision"),
                           run={"checkpoint_every_steps": 1}, optim={"epochs": 3})
    config = write_config(tmp_path / "c.yaml", raw)
    reference = write_config(tmp_path / "ref.yaml", {**raw, "run": {**raw["run"], "out_dir": str(tmp_path / "ref")}})
    assert torchrun("train", "--config", str(reference)).returncode == 0

    # 0.4 s per step: the run lasts long enough for the signal sent after its first checkpoint.
    command, env = torchrun_command("train", "--config", str(config), hooks={"step_delay": "0.4"})
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(tmp_path / "runs" / "tiny" / "last.pt", process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode != 0, err[-3000:]
    assert err.count("kept a checkpoint of step") == 1 and "torchrun <same options>" in err
    assert load_checkpoint(tmp_path / "runs" / "tiny" / "last.pt")["step"] < 15
    resumed = torchrun("train", "--config", str(config), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert same_weights(tmp_path / "ref" / "tiny" / "last.pt", tmp_path / "runs" / "tiny" / "last.pt")


def test_a_stop_requested_on_one_rank_stops_every_rank_at_the_same_step(tiny_imagefolder, tmp_path):
    raw = tiny_config_dict(tiny_imagefolder, tmp_path / "runs", data=backend_section("torchvision"))
    config = write_config(tmp_path / "c.yaml", raw)
    reference = write_config(tmp_path / "ref.yaml", {**raw, "run": {**raw["run"], "out_dir": str(tmp_path / "ref")}})
    assert torchrun("train", "--config", str(reference)).returncode == 0
    # Rank 1 alone asks to stop after step 3; the ranks agree at the next log interval (step 4).
    stopped = torchrun("train", "--config", str(config), hooks={"stop_at": "1:3"})
    assert stopped.returncode != 0 and "kept a checkpoint of step" in stopped.stderr, stopped.stderr[-3000:]
    assert "kept a checkpoint of step 4" in stopped.stderr
    checkpoint = load_checkpoint(tmp_path / "runs" / "tiny" / "last.pt")
    assert checkpoint["step"] == 4 and len(checkpoint["ranks"]) == 2
    resumed = torchrun("train", "--config", str(config), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert same_weights(tmp_path / "ref" / "tiny" / "last.pt", tmp_path / "runs" / "tiny" / "last.pt")


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_distillation_resumes_exactly_under_torchrun(tiny_imagefolder, tiny_teacher, tmp_path, backend):  # noqa: F811
    raw = distill_dict(tiny_imagefolder, tmp_path / "runs", tiny_teacher)
    raw["data"].update(backend_section(backend))
    config = write_config(tmp_path / "kd.yaml", raw)
    reference = write_config(tmp_path / "ref.yaml", {**raw, "run": {**raw["run"], "out_dir": str(tmp_path / "ref")}})
    assert torchrun("distill", "--config", str(reference)).returncode == 0
    stopped = torchrun("distill", "--config", str(config), hooks={"stop_at": "0:6"})  # inside epoch 2
    assert stopped.returncode != 0 and "kept a checkpoint of step" in stopped.stderr, stopped.stderr[-3000:]
    assert load_checkpoint(tmp_path / "runs" / "tiny" / "last.pt")["step"] == 6
    resumed = torchrun("distill", "--config", str(config), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert same_weights(tmp_path / "ref" / "tiny" / "last.pt", tmp_path / "runs" / "tiny" / "last.pt")


def test_a_failing_rank_brings_the_job_down_with_its_error(tiny_imagefolder, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_imagefolder, root)
    victim = next((root / "train" / "warm_disc").iterdir())
    victim.write_bytes(b"\xff\xd8\xff broken")  # lands in one rank's shard only
    raw = tiny_config_dict(root, tmp_path / "runs", data={**backend_section("torchvision"), "verify_images": False})
    # A job that hung on the failed rank instead would raise TimeoutExpired here.
    done = torchrun("train", "--config", str(write_config(tmp_path / "c.yaml", raw)), timeout=240)
    assert done.returncode != 0
    assert f"fastkd: error: cannot decode {victim}" in done.stderr


def test_resuming_with_another_number_of_processes_is_refused(tiny_imagefolder, tmp_path, capsys):
    from fastkd.cli import main

    raw = tiny_config_dict(tiny_imagefolder, tmp_path / "runs", data=backend_section("torchvision"),
                           optim={"epochs": 1, "warmup_epochs": 0})
    config = write_config(tmp_path / "c.yaml", raw)
    assert torchrun("train", "--config", str(config)).returncode == 0
    run_dir = tmp_path / "runs" / "tiny"
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    with pytest.raises(SystemExit) as info:
        main(["train", "--config", str(config), "--resume"])
    assert info.value.code == 2
    assert "was written by 2 process(es); resume with the same number (now 1)" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before


def test_the_ema_of_the_weights_under_torchrun_is_saved_evaluated_and_resumed_exactly(tiny_imagefolder, tmp_path):
    raw = tiny_config_dict(tiny_imagefolder, tmp_path / "runs", data=backend_section("torchvision"),
                           model={"ema_decay": 0.8})
    config = write_config(tmp_path / "c.yaml", raw)
    reference = write_config(tmp_path / "ref.yaml", {**raw, "run": {**raw["run"], "out_dir": str(tmp_path / "ref")}})
    done = torchrun("train", "--config", str(reference))
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "ref" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["val_images"] == 20 and "val_ema_top1" in r for r in records)  # every val image once, both weights
    stopped = torchrun("train", "--config", str(config), hooks={"stop_at": "1:3"})
    assert stopped.returncode != 0 and "kept a checkpoint of step 4" in stopped.stderr, stopped.stderr[-3000:]
    resumed = torchrun("train", "--config", str(config), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_checkpoint(tmp_path / "ref" / "tiny" / "last.pt")["ema"]
    b = load_checkpoint(tmp_path / "runs" / "tiny" / "last.pt")["ema"]
    assert all(torch.equal(a[k], b[k]) for k in a)
