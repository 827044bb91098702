"""Bad data, signals, kill -9, non-finite losses, full disks, corrupt checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from fastkd import commands, loop
from fastkd.checkpoint import load_checkpoint
from fastkd.cli import main
from fastkd.errors import FastkdError
from pipelines.verify import find_broken_images, image_problem
from tests.conftest import (HOOKED_FASTKD, REPO, backend_data, cli_error, hooked_env, tiny_config, tiny_config_dict, wait_for,
                            write_config)

BROKEN = ("truncated.jpg", "empty.jpg", "text.jpg")


def plant_broken_files(root: Path) -> list[Path]:
    """Copy of a dataset's class folder gains a truncated JPEG, an empty file and a text file."""
    folder = root / "train" / "cool_disc"
    good = next(folder.iterdir()).read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not an image\n")
    return [folder / name for name in BROKEN]


def plant_unusual_files(folder: Path) -> None:
    colour = Image.new("RGB", (50, 40), (10, 120, 200))
    Image.new("L", (50, 40), 90).save(folder / "gray.jpg")
    Image.new("CMYK", (50, 40), (0, 100, 200, 10)).save(folder / "cmyk.jpg")
    colour.save(folder / "progressive.jpg", progressive=True)
    colour.save(folder / "png_named.jpg", format="PNG")
    Image.new("RGB", (1, 1)).save(folder / "tiny.jpg")
    Image.new("RGB", (4000, 3000), (5, 5, 5)).save(folder / "huge.jpg", quality=50)


@pytest.fixture
def broken_dataset(tiny_imagefolder, tmp_path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(tiny_imagefolder, root)
    plant_broken_files(root)
    plant_unusual_files(root / "train" / "warm_ring")
    return root


def test_verify_lists_each_broken_file_with_its_reason_and_exits_nonzero(broken_dataset, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["data", "verify", str(broken_dataset), "--workers", "2"])
    assert info.value.code == 1
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    folder = broken_dataset / "train" / "cool_disc"
    assert sorted(lines) == sorted([f"{folder / 'empty.jpg'}: empty file", f"{folder / 'text.jpg'}: not an image, "
                                    "or an unsupported format", f"{folder / 'truncated.jpg'}: truncated"])
    assert "3 cannot" in captured.err  # grayscale, CMYK, progressive, PNG-as-JPG, tiny, huge all pass


def test_verify_writes_clean_lists_usable_as_filelist_data(broken_dataset, tmp_path, capsys):
    clean = tmp_path / "clean.txt"
    with pytest.raises(SystemExit):
        main(["data", "verify", str(broken_dataset), "--write-clean-list", str(clean)])
    capsys.readouterr()
    listed = clean.read_text()
    assert "truncated.jpg" not in listed and "gray.jpg" in listed
    main(["data", "verify", str(broken_dataset), "--format", "filelist", "--train-list", str(clean),
          "--val-list", str(tmp_path / "clean.val.txt"), "--classes-file", str(tmp_path / "clean.classes.txt")])
    assert "0 cannot" in capsys.readouterr().err


def test_unusual_but_valid_images_are_not_flagged(tmp_path):
    plant_unusual_files(tmp_path)
    assert [image_problem(str(p)) for p in sorted(tmp_path.iterdir())] == [None] * 6


def test_verification_results_are_cached_by_size_and_mtime(broken_dataset, tmp_path):
    files = [str(p) for p in sorted((broken_dataset / "train" / "cool_disc").iterdir())]
    first = find_broken_images(files, root=broken_dataset, workers=1, progress=False)
    assert len(first) == 3
    fixed = broken_dataset / "train" / "cool_disc" / "text.jpg"
    Image.new("RGB", (8, 8)).save(fixed, format="JPEG")
    again = find_broken_images(files, root=broken_dataset, workers=1, progress=False)
    assert {Path(b.path).name for b in again} == {"truncated.jpg", "empty.jpg"}


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_training_on_broken_data_stops_before_the_first_step(broken_dataset, tmp_path, capsys, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    raw = tiny_config_dict(broken_dataset, tmp_path / "runs", data=backend_data(backend))
    message = cli_error(capsys, "train", "--config", str(write_config(tmp_path / "c.yaml", raw)))
    assert message.startswith("fastkd: error: cannot decode ")
    assert "and 2 more; list them with `fastkd data verify" in message and "data.skip_broken: true" in message
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_skip_broken_trains_without_them_and_lists_them(broken_dataset, tmp_path, capsys, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    cfg = tiny_config(broken_dataset, tmp_path / "runs", data={**backend_data(backend),
                                                               "skip_broken": True},
                      optim={"epochs": 1, "warmup_epochs": 0})
    commands.train(cfg, progress=False)
    err = capsys.readouterr().err
    assert "training without 3 image(s) that cannot be decoded" in err
    for name in BROKEN:
        assert name in err
    records = (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(records[-1])["epoch"] == 1


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_a_file_broken_after_the_check_is_a_one_line_error(broken_dataset, tmp_path, capsys, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    for name in BROKEN:  # a clean dataset passes the check...
        (broken_dataset / "train" / "cool_disc" / name).unlink()
    raw = tiny_config_dict(broken_dataset, tmp_path / "runs", data={**backend_data(backend),
                                                                    "verify_images": False, "num_workers": 1})
    victim = next((broken_dataset / "train" / "warm_disc").iterdir())
    victim.write_bytes(b"\xff\xd8\xff garbage")  # ...then a file breaks (verification switched off)
    message = cli_error(capsys, "train", "--config", str(write_config(tmp_path / "c.yaml", raw)))
    assert "list every undecodable file with `fastkd data verify ROOT`" in message
    assert str(victim) in message  # both backends name the file


def start_training(config: Path, *extra: str, **hooks: str) -> subprocess.Popen:
    """`fastkd train` in its own process group, as a shell job (Ctrl-C and schedulers signal the
    whole group), with the test hooks of tests/fastkd_with_hooks.py given as keyword arguments."""
    return subprocess.Popen([sys.executable, HOOKED_FASTKD, "train", "--config", str(config), "--no-progress",
                             *extra], cwd=REPO, env=hooked_env(**hooks), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def resume_to_the_end(config: Path, run_dir: Path, reference_run: Path) -> None:
    """`--resume` finishes the run with weights bit-identical to the uninterrupted reference."""
    finished = start_training(config, "--resume")
    _, err = finished.communicate(timeout=300)
    assert finished.returncode == 0, err
    expected = load_checkpoint(reference_run / "last.pt")["model"]
    for key, value in load_checkpoint(run_dir / "last.pt")["model"].items():
        assert torch.equal(value, expected[key]), key


@pytest.fixture(scope="module")
def reference_run(tiny_imagefolder, tmp_path_factory) -> Path:
    """An uninterrupted 3-epoch run to compare interrupted ones with."""
    out = tmp_path_factory.mktemp("reference")
    cfg = tiny_config(tiny_imagefolder, out, optim={"epochs": 3})
    return commands.train(cfg, progress=False).run_dir


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_checkpoints_and_resume_is_exact(tiny_imagefolder, tmp_path, reference_run, signum):
    # DataLoader workers get the signal too (sent to the process group) and must not die of it.
    config = write_config(tmp_path / "c.yaml", tiny_config_dict(
        tiny_imagefolder, tmp_path / "runs", optim={"epochs": 3}, run={"checkpoint_every_steps": 1},
        data={"num_workers": 2}))
    process = start_training(config, step_delay="0.4")  # 15 steps: about 6 s, signalled after the first
    wait_for(tmp_path / "runs" / "tiny" / "last.pt", process)
    os.killpg(process.pid, signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err
    assert f"fastkd: stopped by {signal.Signals(signum).name}; kept a checkpoint of step" in err
    assert "; resume with:\n  fastkd train --resume --config" in err and "Traceback" not in err
    stopped = load_checkpoint(tmp_path / "runs" / "tiny" / "last.pt")["step"]
    assert 1 <= stopped < 15
    resume_to_the_end(config, tmp_path / "runs" / "tiny", reference_run)


def start_fastkd(*argv: str, **hooks: str) -> subprocess.Popen:
    """`fastkd ARGV` in its own process group, with the hooks of tests/fastkd_with_hooks.py."""
    return subprocess.Popen([sys.executable, HOOKED_FASTKD, *argv], cwd=REPO, env=hooked_env(**hooks),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["distill", "teacher-cache", "demo"])
def test_every_command_that_trains_or_records_stops_cleanly_and_the_line_it_prints_goes_on(
        tiny_imagefolder, tmp_path, reference_run, command):
    """SIGTERM to the process group mid-run: exit 143, one line saying what was kept and the
    command that goes on, no traceback, nothing half-written; that command then finishes."""
    teacher = {"teacher": {"arch": "resnet18", "checkpoint": str(reference_run / "best.pt")},
               "allow_weak_teacher": True}
    cache = tmp_path / "cache"
    if command == "demo":
        argv = ["demo", "--out", str(tmp_path / "demo"), "--no-progress", f"data.root={tiny_imagefolder}",
                "data.image_size=32", "data.val_resize=36", "data.batch_size=8", "data.num_workers=0",
                "data.generate_demo=false", "optim.epochs=1", "optim.warmup_epochs=0", "runtime.device=cpu",
                "run.tensorboard=false", "distill.allow_weak_teacher=true", "run.checkpoint_every_steps=1"]
        signal_when = tmp_path / "demo" / "teacher" / "last.pt"  # the first run has checkpointed a step
        kept, goes_on = "kept a checkpoint of step", "go on with the same command"
    else:
        raw = tiny_config_dict(tiny_imagefolder, tmp_path / "runs", run={"checkpoint_every_steps": 1},
                               distill={**teacher, **({"teacher_cache": str(cache)} if command == "teacher-cache"
                                                      else {})})
        argv = [command, "--config", str(write_config(tmp_path / "c.yaml", raw)), "--no-progress"]
        if command == "distill":
            signal_when, kept, goes_on = tmp_path / "runs" / "tiny" / "last.pt", "kept a checkpoint of step", \
                "resume with:\n  fastkd distill --resume --config"
        else:  # epoch 0 recorded; the stop lands before epoch 1 or during it (its rows then discarded)
            signal_when, kept, goes_on = cache / "epoch-0000.npy", f"kept the teacher cache {cache} with epochs 0-0", \
                "record the rest with the same command:\n  fastkd teacher-cache --config"
    process = start_fastkd(*argv, step_delay="0.4")
    wait_for(signal_when, process)
    os.killpg(process.pid, signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    line = err[err.index("fastkd: stopped by SIGTERM"):]
    assert kept in line and goes_on in line and "Traceback" not in err, err
    if command == "teacher-cache":
        assert sorted(p.name for p in cache.iterdir()) == ["epoch-0000.npy", "manifest.json"]  # no temporary file
    again = shlex.split(line.splitlines()[1].strip())
    assert again[0] == "fastkd"
    finished = start_fastkd(*again[1:])
    out, err = finished.communicate(timeout=300)
    assert finished.returncode == 0, err
    if command == "teacher-cache":
        assert "recorded epochs 1;" in out
    if command == "demo":
        assert (tmp_path / "demo" / "demo.md").is_file()


@pytest.mark.slow
def test_kill_9_inside_and_between_checkpoint_writes_leaves_a_loadable_checkpoint(tiny_imagefolder, tmp_path,
                                                                                  reference_run):
    config = write_config(tmp_path / "c.yaml", tiny_config_dict(
        tiny_imagefolder, tmp_path / "runs", optim={"epochs": 3}, run={"checkpoint_every_steps": 1}))
    last = tmp_path / "runs" / "tiny" / "last.pt"
    # Killed after writing its 3rd checkpoint's temporary file, before the rename: last.pt is the
    # 2nd one (step 2) and the temporary file is left behind.
    process = start_training(config, kill_in_write="3")
    process.communicate(timeout=120)
    assert process.returncode == -signal.SIGKILL
    assert load_checkpoint(last)["step"] == 2
    assert [p.name for p in last.parent.iterdir() if ".tmp-" in p.name], "the kill should have left a temp file"
    # Resumed, then killed right after its 2nd write (a rename just done): step 4 is on disk.
    process = start_training(config, "--resume", kill_after_write="2")
    process.communicate(timeout=120)
    assert process.returncode == -signal.SIGKILL and load_checkpoint(last)["step"] == 4
    resume_to_the_end(config, tmp_path / "runs" / "tiny", reference_run)
    assert not [p.name for p in last.parent.iterdir() if ".tmp-" in p.name], "stale temporary files left"


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny_imagefolder, tmp_path,
                                                                                monkeypatch):
    from fastkd.steps import ClassificationStep

    original = ClassificationStep.forward
    calls = {"n": 0}

    def poisoned(self, batch):
        out = original(self, batch)
        calls["n"] += 1
        if calls["n"] == 7:  # step 7: inside epoch 2 (5 steps per epoch)
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(ClassificationStep, "forward", poisoned)
    cfg = tiny_config(tiny_imagefolder, tmp_path / "runs", run={"log_every_steps": 1})
    with pytest.raises(FastkdError, match=r"loss became non-finite \(nan/inf\) at step 7; stopped without saving"):
        commands.train(cfg, progress=False)
    checkpoint = load_checkpoint(tmp_path / "runs" / "tiny" / "last.pt")
    assert checkpoint["step"] == 5 and all(torch.isfinite(v).all() for v in checkpoint["model"].values()
                                           if v.is_floating_point())


def test_an_update_that_breaks_the_weights_is_never_saved(tiny_imagefolder, tmp_path, monkeypatch):
    """The loss of step 10 is finite (it is computed before the update); the update itself makes a
    weight NaN just before the epoch's checkpoint: nothing may write those weights."""
    original = loop.apply_update
    steps = {"n": 0}

    def breaking(optimizer, scaler, params, grad_clip_norm):
        original(optimizer, scaler, params, grad_clip_norm)
        steps["n"] += 1
        if steps["n"] == 10:
            with torch.no_grad():
                params[0].fill_(float("nan"))

    monkeypatch.setattr(loop, "apply_update", breaking)
    cfg = tiny_config(tiny_imagefolder, tmp_path / "runs", run={"log_every_steps": 1})
    with pytest.raises(FastkdError, match=r"the weights became non-finite \(nan/inf\) by step 10; stopped without"):
        commands.train(cfg, progress=False)
    for name in ("last.pt", "best.pt"):
        checkpoint = load_checkpoint(tmp_path / "runs" / "tiny" / name)
        assert checkpoint["step"] == 5
        assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())


def test_disk_full_while_saving_is_one_line_and_keeps_the_previous_checkpoint(tiny_imagefolder, tmp_path,
                                                                               monkeypatch, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_config_dict(tiny_imagefolder, tmp_path / "runs"))
    real_save = torch.save
    saves = {"n": 0}

    def fill_disk(obj, f, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fill_disk)
    last = tmp_path / "runs" / "tiny" / "last.pt"
    message = cli_error(capsys, "train", "--config", str(config), "--no-progress")
    assert message == (f"fastkd: error: could not write checkpoint {last}: No space left on device; "
                       "the previous checkpoint is intact")
    monkeypatch.undo()
    assert load_checkpoint(last)["epoch"] == 1


def test_an_unusable_run_directory_is_one_line(tiny_imagefolder, tmp_path, capsys):
    (tmp_path / "runs").write_text("a file where the run folder should go")
    config = write_config(tmp_path / "c.yaml", tiny_config_dict(tiny_imagefolder, tmp_path / "runs"))
    message = cli_error(capsys, "train", "--config", str(config))
    assert message.startswith(f"fastkd: error: cannot create run directory {tmp_path / 'runs' / 'tiny'}")


def test_resume_from_a_corrupt_checkpoint_is_refused_and_nothing_is_overwritten(tiny_imagefolder, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_config_dict(tiny_imagefolder, tmp_path / "runs"))
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "last.pt").write_bytes(b"PK\x03\x04 cut short")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    message = cli_error(capsys, "train", "--config", str(config), "--resume")
    assert message.startswith(f"fastkd: error: checkpoint is corrupt, truncated or not a PyTorch file: {run_dir / 'last.pt'}")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


@pytest.mark.parametrize("override, expected", [
    ("distill.temperature=0", "distill.temperature: must be > 0, got 0.0"),
    ("data.batch_size=0", "data.batch_size: must be >= 1, got 0"),
    ("optim.lr=-1", "optim.lr: must be > 0, got -1.0"),
])
def test_impossible_values_are_refused_before_anything_is_written(tiny_imagefolder, tmp_path, capsys, override,
                                                                  expected):
    raw = tiny_config_dict(tiny_imagefolder, tmp_path / "runs")
    raw["distill"] = {"teacher": {"arch": "resnet18", "checkpoint": "t.pt"}}
    message = cli_error(capsys, "distill", "--config", str(write_config(tmp_path / "c.yaml", raw)), override)
    assert message == f"fastkd: error: {expected}"
    assert not (tmp_path / "runs").exists()


def test_stop_request_between_epochs_stops_after_the_epoch_checkpoint(tiny_imagefolder, tmp_path, monkeypatch):
    original = loop.agree_to_stop

    def fake(t):
        if t.state.step == 5:
            t.stop.signum = signal.SIGTERM
        return original(t)

    monkeypatch.setattr(loop, "agree_to_stop", fake)
    with pytest.raises(loop.Interrupted):
        commands.train(tiny_config(tiny_imagefolder, tmp_path / "runs"), progress=False)
    checkpoint = load_checkpoint(tmp_path / "runs" / "tiny" / "last.pt")
    assert checkpoint["epoch"] == 1 and checkpoint["step"] == 5


def test_importing_fastkd_changes_nothing_global_and_exit_kills_only_its_own_workers(tiny_imagefolder, tmp_path):
    """No exit hook and no PIL limit change at import; after a DataLoader with workers has run, exit
    still returns promptly (its workers ignore SIGTERM) and leaves unrelated children alone: one
    alive across the loader's first iter(), one started after it (each runs to its end)."""
    script = tmp_path / "probe.py"
    script.write_text(f'''
import atexit, multiprocessing, os, sys, time
import numpy, torch, torchvision, PIL.Image, tqdm  # what fastkd imports: their own hooks are not ours
before, limit = atexit._ncallbacks(), PIL.Image.MAX_IMAGE_PIXELS
import fastkd.commands, fastkd.bench, pipelines.torchvision_backend, pipelines.verify
from pipelines.verify import image_problem
assert atexit._ncallbacks() == before, "an exit hook was registered at import"
image_problem({str(next((tiny_imagefolder / "train" / "cool_disc").iterdir()))!r})
assert PIL.Image.MAX_IMAGE_PIXELS == limit, "the PIL pixel limit was changed"
from fastkd.data import build_loaders
from tests.conftest import CPU, data_config
loader = build_loaders(data_config({str(tiny_imagefolder)!r}, "torchvision", num_workers=2), spec=CPU, seed=0).train
early = multiprocessing.Process(target=os.system, args=("sleep 8; touch {tmp_path / 'early-done'}",), daemon=False)
early.start()
next(iter(loader))
assert early.is_alive(), "the foreign child must be alive across the first iter()"
print("workers", *[w.pid for w in pipelines.torchvision_backend._OUR_WORKERS], flush=True)
other = multiprocessing.Process(target=os.system, args=("sleep 2; touch {tmp_path / 'other-done'}",), daemon=False)
other.start()
print("other", other.pid, early.pid, flush=True)
''')
    done = subprocess.run([sys.executable, str(script)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    workers, others = [int(p) for p in lines["workers"].split()], [int(p) for p in lines["other"].split()]
    assert len(workers) == 2 and not set(workers) & set(others)

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    assert not any(alive(pid) for pid in workers)  # exit killed them (else it waits forever: TimeoutExpired)
    assert not any(alive(pid) for pid in others)
    # the non-daemonic children ran to their end: exit waited for them, untouched
    assert (tmp_path / "early-done").exists() and (tmp_path / "other-done").exists()


def test_a_run_saved_before_drop_last_existed_resumes_only_with_the_key_it_trained_with(tiny_imagefolder, tmp_path,
                                                                                          capsys):
    """A checkpoint whose config has no `data.drop_last` trained on every partial batch: its resume
    is refused in one line naming `data.drop_last=false` (its own config.yaml lacks the key too),
    and goes on with it."""
    from fastkd.checkpoint import save_checkpoint

    config = write_config(tmp_path / "c.yaml", tiny_config_dict(tiny_imagefolder, tmp_path / "runs",
                                                                optim={"epochs": 1, "warmup_epochs": 0}))
    main(["train", "--config", str(config), "--no-progress"])
    last = tmp_path / "runs" / "tiny" / "last.pt"
    checkpoint = load_checkpoint(last)
    del checkpoint["config"]["data"]["drop_last"]  # as fastkd wrote it before the key existed
    save_checkpoint(last, checkpoint)
    before = last.read_bytes()
    message = cli_error(capsys, "train", "--config", str(config), "--resume")
    assert message == (f"fastkd: error: --resume: {last} was saved before data.drop_last existed and trains on every "
                       "partial last batch; resume it with data.drop_last=false")
    assert last.read_bytes() == before
    main(["train", "--config", str(config), "--resume", "data.drop_last=false", "--no-progress"])  # no error
    assert load_checkpoint(last)["step"] == checkpoint["step"]
