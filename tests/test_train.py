from __future__ import annotations

import json

import pytest
import torch
import torchvision
import yaml

from fastkd import commands, loop
from fastkd.checkpoint import load_checkpoint
from fastkd.cli import main
from tests.conftest import backend_data, cli_error, run_cli, stop_after, tiny_config, tiny_config_dict, write_config


@pytest.mark.slow
def test_train_then_eval_end_to_end(tiny_imagefolder, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_config_dict(tiny_imagefolder, tmp_path / "runs"))
    done = run_cli("train", "--config", str(config), "run.name=e2e", "run.tensorboard=true")
    assert done.returncode == 0, done.stderr
    run_dir = tmp_path / "runs" / "e2e"
    assert {"config.yaml", "env.json", "metrics.jsonl", "last.pt", "best.pt", "summary.json",
            "tensorboard"} <= {p.name for p in run_dir.iterdir()}

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["run"]["name"] == "e2e" and saved["data"]["image_size"] == 32
    env = json.loads((run_dir / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["torchvision"] == torchvision.__version__
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for key in ("step", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5",
                "train_images_per_sec", "epoch_seconds"):
        assert all(key in r for r in records), key
    assert records[-1]["step"] == 2 * 5 and records[-1]["val_images"] == 20
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["epochs"] == 2
    assert summary["train_val_gap"] == pytest.approx(records[-1]["train_top1"] - records[-1]["val_top1"], abs=1e-3)
    assert summary["best_val_top1"] == max(r["val_top1"] for r in records)

    checkpoint = load_checkpoint(run_dir / "best.pt")
    assert checkpoint["arch"] == "resnet18" and len(checkpoint["classes"]) == 10
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(checkpoint["model"], strict=True)  # no module./_orig_mod. prefixes

    evaluated = run_cli("eval", "--checkpoint", str(run_dir / "best.pt"), "--config", str(config))
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"val top1 {summary['best_val_top1']:.2f}" in evaluated.stdout


def test_reusing_a_run_directory_without_resume_is_refused(tiny_imagefolder, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_config_dict(tiny_imagefolder, tmp_path / "runs"))
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "last.pt").write_bytes(b"precious")
    message = cli_error(capsys, "train", "--config", str(config))
    assert message == (f"fastkd: error: run directory already exists: {run_dir} "
                       "(continue it with --resume, or choose another run.name)")
    assert (run_dir / "last.pt").read_bytes() == b"precious"


def test_resume_with_nothing_to_resume_is_an_error(tiny_imagefolder, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_config_dict(tiny_imagefolder, tmp_path / "runs"))
    message = cli_error(capsys, "train", "--config", str(config), "--resume")
    assert message.endswith("--resume: nothing to resume in " + str(tmp_path / "runs" / "tiny") + " (no last.pt)")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("overrides, expected", [
    (["model.arch=resnet19"], "model.arch: 'resnet19' is not a torchvision classification model (did you mean resnet18?)"),
    (["data.root=/does/not/exist"], "data.root: dataset folder not found: /does/not/exist"),
    (["optim.lr=0"], "optim.lr: must be > 0, got 0.0"),
    (["data.bath_size=4"], "data.bath_size: unknown key (did you mean data.batch_size?)"),
])
def test_mistakes_exit_with_code_2_and_one_line_and_write_nothing(tiny_imagefolder, tmp_path, capsys,
                                                                  overrides, expected):
    config = write_config(tmp_path / "c.yaml", tiny_config_dict(tiny_imagefolder, tmp_path / "runs"))
    assert cli_error(capsys, "train", "--config", str(config), *overrides) == f"fastkd: error: {expected}"
    assert not (tmp_path / "runs").exists()


def test_user_errors_show_no_traceback_in_a_real_process(tmp_path):
    done = run_cli("train", "--config", str(tmp_path / "missing.yaml"))
    assert done.returncode == 2
    assert done.stderr.strip() == f"fastkd: error: config file not found: {tmp_path / 'missing.yaml'}"


@pytest.mark.slow
@pytest.mark.parametrize("arch, stop_step, backend, precision", [("resnet18", 7, "torchvision", "fp32"),
                                                                 ("mobilenet_v3_small", 5, "torchvision", "fp32"),
                                                                 ("resnet18", 3, "dali", "fp32"),
                                                                 ("resnet18", 7, "torchvision", "fp16")])
def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(tiny_imagefolder, tmp_path, monkeypatch,
                                                                   arch, stop_step, backend, precision):
    # mobilenet_v3_small has dropout: resuming must also restore the RNG exactly; fp16 runs
    # through the GradScaler, whose scale and growth tracker must be restored too.
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    sections = {"model": {"arch": arch}, "data": {"num_workers": 2, **backend_data(backend)},
                "runtime": {"device": "cpu", "deterministic": True, "precision": precision}}
    straight = tiny_config(tiny_imagefolder, tmp_path / "a", **sections)
    commands.train(straight, progress=False)

    interrupted = tiny_config(tiny_imagefolder, tmp_path / "b", **sections)
    with monkeypatch.context() as patch:
        stop_after(patch, stop_step)  # 5 steps per epoch: 7 stops inside epoch 2, 5 at its boundary
        with pytest.raises(loop.Interrupted):
            commands.train(interrupted, progress=False)
    assert load_checkpoint(tmp_path / "b" / "tiny" / "last.pt")["step"] == stop_step
    commands.train(interrupted, resume=True, progress=False)

    a = load_checkpoint(tmp_path / "a" / "tiny" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "tiny" / "last.pt")
    assert a["step"] == b["step"] == 10
    assert a["scaler"] == b["scaler"] and bool(a["scaler"]) == (precision == "fp16")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    lines_a = (tmp_path / "a" / "tiny" / "metrics.jsonl").read_text().splitlines()
    lines_b = (tmp_path / "b" / "tiny" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines_b] == [1, 2]
    assert json.loads(lines_a[-1])["val_top1"] == json.loads(lines_b[-1])["val_top1"]
    assert json.loads(lines_a[-1])["train_loss"] == pytest.approx(json.loads(lines_b[-1])["train_loss"], rel=1e-9)


def test_resume_refuses_a_changed_config(tiny_imagefolder, tmp_path, monkeypatch, capsys):
    raw = tiny_config_dict(tiny_imagefolder, tmp_path / "runs", optim={"epochs": 1, "warmup_epochs": 0})
    config = write_config(tmp_path / "c.yaml", raw)
    with monkeypatch.context() as patch:
        stop_after(patch, 2)
        with pytest.raises(SystemExit) as info:
            main(["train", "--config", str(config), "--no-progress"])
    assert info.value.code == 128 + 15
    assert "fastkd train --resume --config" in capsys.readouterr().err
    message = cli_error(capsys, "train", "--config", str(config), "--resume", "optim.lr=0.5")
    assert message.startswith("fastkd: error: --resume: the config differs from the run's in optim.lr")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_a_run_that_leaves_out_each_epochs_partial_batch_resumes_exactly(tiny_imagefolder, tmp_path, monkeypatch,
                                                                         backend):
    """40 training images in batches of 6: 6 steps an epoch, 4 images left out. A run stopped inside
    its second epoch and resumed (an epoch follows the resumed one) ends with the uninterrupted
    run's weights, step for step."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    configs = {name: tiny_config(tiny_imagefolder, tmp_path / name, optim={"epochs": 3, "warmup_epochs": 0},
                                 data={**backend_data(backend), "batch_size": 6})
               for name in ("straight", "interrupted")}
    commands.train(configs["straight"], progress=False)
    with monkeypatch.context() as patch:
        stop_after(patch, 8)  # the second batch of epoch 2
        with pytest.raises(loop.Interrupted):
            commands.train(configs["interrupted"], progress=False)
    assert load_checkpoint(configs["interrupted"].run_dir / "last.pt")["step"] == 8
    commands.train(configs["interrupted"], resume=True, progress=False)
    a = load_checkpoint(configs["straight"].run_dir / "last.pt")
    b = load_checkpoint(configs["interrupted"].run_dir / "last.pt")
    assert a["step"] == b["step"] == 18  # 3 x floor(40 / 6): the partial batches were left out
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
