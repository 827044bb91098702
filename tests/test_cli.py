"""The README's commands as a user runs them: demo, data synth, config show, eval, export, bad data."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torchvision
import yaml

from fastkd import commands
from fastkd.checkpoint import load_checkpoint
from fastkd.cli import main
from fastkd.synth import MARKER
from tests.conftest import REPO, cli_error, tiny_config, tiny_config_dict, write_config

TINY_DEMO = ["data.image_size=32", "data.val_resize=36", "data.batch_size=8", "data.num_workers=0",
             "data.generate_demo=false", "optim.epochs=1", "optim.warmup_epochs=0", "runtime.device=cpu", "run.tensorboard=false",
             "distill.allow_weak_teacher=true"]


@pytest.mark.slow
def test_demo_trains_teacher_student_and_distilled_student_then_reuses_them(tiny_imagefolder, tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--seeds", "0", "1", "--no-progress", f"data.root={tiny_imagefolder}",
            *TINY_DEMO]
    main(argv)
    printed = capsys.readouterr().out
    # the first line says what is about to happen (no silence until the first epoch's line)
    assert printed.splitlines()[0].startswith(f"[demo] 5 runs into {out}: a resnet18 teacher, then for each seed (0, 1) "
                                              "a shufflenet_v2_x0_5 student alone and one distilled")
    table = printed.split("\n\n")[1] if "\n\n" in printed else printed
    assert table.count("| teacher ") == 1 and table.count("| student alone ") == 2
    assert table.count("| student distilled ") == 2
    assert "Best val top-1, student alone" in printed and (out / "demo.md").is_file()
    result = json.loads((out / "demo.json").read_text())
    assert result["seeds"] == [0, 1] and len(result["student_distilled_top1"]) == 2
    names = ["teacher", "student-s0", "distill-s0", "student-s1", "distill-s1"]
    summaries = {name: (out / name / "summary.json").stat().st_mtime_ns for name in names}
    assert json.loads((out / "distill-s1" / "summary.json").read_text())["teacher"]["arch"] == "resnet18"
    main(argv)  # a second run reuses every finished run
    again = capsys.readouterr().out
    assert again.count("[demo] reusing finished run") == 5
    assert summaries == {name: (out / name / "summary.json").stat().st_mtime_ns for name in names}


def test_version_names_fastkd_git_torch_torchvision_dali_and_cuda(capsys):
    import fastkd
    from fastkd.env import dali_version

    for flag in ("--version", "-V"):
        with pytest.raises(SystemExit) as info:
            main([flag])
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"fastkd {fastkd.__version__} (git ")
        assert f"torch {torch.__version__}" in out and f"torchvision {torchvision.__version__}" in out
        assert f"NVIDIA DALI {dali_version() or 'not installed'}" in out
        assert f"CUDA available: {'yes' if torch.cuda.is_available() else 'no'}" in out


def test_demo_help_shows_the_default_seeds(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "(default: [0])" in " ".join(capsys.readouterr().out.split())


def test_data_synth_writes_the_demo_layout_and_refuses_a_non_empty_folder(tmp_path, capsys):
    out = tmp_path / "synth"
    main(["data", "synth", str(out), "--train-per-class", "2", "--val-per-class", "1", "--workers", "2"])
    assert "wrote 10 classes x (2 train + 1 val) images" in capsys.readouterr().out
    assert len(list((out / "train").rglob("*.jpg"))) == 20 and len(list((out / "val").rglob("*.jpg"))) == 10
    assert (out / MARKER).is_file()
    assert cli_error(capsys, "data", "synth", str(out)) == f"fastkd: error: output folder is not empty: {out}"


def test_config_show_prints_the_resolved_config_with_overrides(capsys):
    main(["config", "show", "--config", str(REPO / "configs" / "demo" / "distill.yaml"), "optim.lr=0.5",
          "distill.temperature=2.5"])
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["optim"]["lr"] == 0.5 and shown["model"]["arch"] == "shufflenet_v2_x0_5"
    assert shown["distill"]["temperature"] == 2.5 and shown["distill"]["kd_weight"] == 0.9
    assert shown["runtime"]["sync_debug"] is False  # defaults are filled in


@pytest.fixture(scope="module")
def finished_run(tiny_imagefolder, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    return commands.train(tiny_config(tiny_imagefolder, out, optim={"epochs": 2}), progress=False).run_dir


def test_eval_takes_a_plain_state_dict_with_arch(finished_run, tiny_imagefolder, tmp_path, capsys):
    plain = tmp_path / "plain.pt"
    torch.save(load_checkpoint(finished_run / "best.pt")["model"], plain)
    config = write_config(tmp_path / "c.yaml", tiny_config_dict(tiny_imagefolder, tmp_path / "runs",
                                                                 model={"arch": "shufflenet_v2_x0_5"}))
    main(["eval", "--checkpoint", str(plain), "--arch", "resnet18", "--config", str(config)])
    line = capsys.readouterr().out
    assert line.startswith(f"resnet18 {plain}: val top1 ") and "(20 images)" in line
    summary = json.loads((finished_run / "summary.json").read_text())
    assert f"val top1 {summary['best_val_top1']:.2f}" in line  # the same weights, the same figure
    # Without --arch the config's model (a ShuffleNet) cannot take ResNet weights: one line, exit 2.
    message = cli_error(capsys, "eval", "--checkpoint", str(plain), "--config", str(config))
    assert message.startswith(f"fastkd: error: --checkpoint: {plain} does not fit shufflenet_v2_x0_5 with 10 classes: ")
    # whole key names, counted, and the argument that fixes it
    assert "key(s) missing from the file (conv1.0.weight, conv1.1.weight, conv1.1.bias, ... (" in message
    assert "unexpected key(s) (conv1.weight, bn1.weight, bn1.bias, ... (" in message
    assert message.endswith("(a plain state_dict is loaded into model.arch, shufflenet_v2_x0_5: pass --arch NAME for "
                            "another architecture)")
    missing = cli_error(capsys, "eval", "--checkpoint", str(tmp_path / "nope.pt"), "--config", str(config))
    assert missing == f"fastkd: error: --checkpoint: checkpoint not found: {tmp_path / 'nope.pt'}"


def test_a_refused_export_writes_nothing(finished_run, tmp_path, capsys, monkeypatch):
    import importlib.util

    import fastkd.export as export

    out = tmp_path / "export" / "student.pt"
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real_find_spec(name, *a))
    message = cli_error(capsys, "export", str(finished_run), "--out", str(out), "--onnx")
    assert message == f"fastkd: error: {export.ONNX_HINT} (onnxruntime not installed)"
    assert "pip install -e '.[onnx]'" in message
    assert not (tmp_path / "export").exists()
    monkeypatch.undo()
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(export, "ONNX_TOLERANCE", -1.0)  # every ONNX check fails
    message = cli_error(capsys, "export", str(finished_run), "--out", str(out), "--onnx")
    assert message.startswith(f"fastkd: error: {out.with_suffix('.onnx')}: ONNX output differs from PyTorch")
    assert not (tmp_path / "export").exists()
    main(["export", str(finished_run), "--out", str(out)])  # without --onnx it goes through
    assert sorted(p.name for p in out.parent.iterdir()) == ["student.json", "student.pt"]


def test_export_of_last_writes_the_last_checkpoints_weights(finished_run, tmp_path, capsys):
    out = tmp_path / "export" / "last.pt"
    main(["export", str(finished_run), "--out", str(out), "--checkpoint", "last"])
    assert "exported resnet18 (10 classes" in capsys.readouterr().out
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    last = load_checkpoint(finished_run / "last.pt")
    assert all(torch.equal(v, last["model"][k]) for k, v in model.state_dict().items())
    assert json.loads(out.with_suffix(".json").read_text())["epoch"] == last["epoch"] == 2


def test_export_of_a_checkpoint_that_does_not_fit_is_one_line(finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    payload = load_checkpoint(run / "best.pt")
    payload["arch"] = "resnet34"
    torch.save(payload, run / "best.pt")
    message = cli_error(capsys, "export", str(run), "--out", str(tmp_path / "x.pt"))
    assert message.startswith(f"fastkd: error: {run / 'best.pt'} does not fit resnet34 with 10 classes")
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("damage, expected", [
    ("empty class", "class folder has no images"),
    ("val-only class", "val class folder(s) missing from train: mystery"),
])
def test_bad_data_through_the_cli_exits_2_and_writes_nothing(tiny_imagefolder, tmp_path, capsys, damage, expected):
    root = tmp_path / "data"
    shutil.copytree(tiny_imagefolder, root)
    if damage == "empty class":
        (root / "train" / "zzz_empty").mkdir()
    else:
        shutil.copytree(root / "val" / "cool_disc", root / "val" / "mystery")
    config = write_config(tmp_path / "c.yaml", tiny_config_dict(root, tmp_path / "runs"))
    message = cli_error(capsys, "train", "--config", str(config))
    assert message.startswith("fastkd: error: ") and expected in message
    assert not (tmp_path / "runs").exists()


def test_messages_go_through_the_fastkd_logger_and_can_be_quieted(tiny_imagefolder, tmp_path, capsys, monkeypatch):
    import logging

    from fastkd.log import RankZeroOnly, log

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    log.addHandler(handler)
    try:
        config = write_config(tmp_path / "c.yaml", tiny_config_dict(tiny_imagefolder, tmp_path / "runs",
                                                                     optim={"epochs": 1, "warmup_epochs": 0}))
        main(["train", "--config", str(config), "--no-progress"])
        out = capsys.readouterr().out
        assert any(r.getMessage().startswith("epoch   1  train loss") for r in records)  # redirectable
        assert "epoch   1  train loss" in out
        records.clear()
        main(["--log-level", "warning", "train", "--config", str(config), "--no-progress", "run.name=quiet"])
        out = capsys.readouterr().out
        assert "epoch   1" not in out and not records
        assert out.startswith(f"run {tmp_path / 'runs' / 'quiet'}: best_val_top1 ")  # the result still prints
    finally:
        log.removeHandler(handler)
        log.setLevel(logging.INFO)
    info = logging.LogRecord("fastkd", logging.INFO, __file__, 1, "m", None, None)
    error = logging.LogRecord("fastkd", logging.ERROR, __file__, 1, "m", None, None)
    monkeypatch.setenv("RANK", "1")
    assert not RankZeroOnly().filter(info) and RankZeroOnly().filter(error)
    monkeypatch.setenv("RANK", "0")
    assert RankZeroOnly().filter(info)


def test_eval_of_a_broken_validation_image_is_one_line_naming_it(finished_run, tiny_imagefolder, tmp_path, capsys):
    """`fastkd eval` builds its run as training does (validation images checked first): a file that
    cannot be decoded is named in one line, exit 2."""
    data = tmp_path / "data"
    shutil.copytree(tiny_imagefolder, data)
    broken = sorted((data / "val").rglob("*.jpg"))[3]
    broken.write_bytes(b"\xff\xd8\xff not a jpeg")
    config = write_config(tmp_path / "c.yaml", tiny_config_dict(data, tmp_path / "runs"))
    message = cli_error(capsys, "eval", "--checkpoint", str(finished_run / "best.pt"), "--config", str(config))
    assert message.startswith(f"fastkd: error: cannot decode {broken} (") and "fastkd data verify" in message


@pytest.mark.parametrize("argv", [
    ["train", "--config", "c.yaml", "optim.lr=0.05", "--no-progress", "run.name=b"],
    ["distill", "optim.lr=0.05", "--config", "c.yaml", "--resume", "run.name=b"],
    ["teacher-cache", "--config", "c.yaml", "optim.lr=0.05", "--dtype", "fp32", "run.name=b", "--epochs", "2"],
    ["eval", "--checkpoint", "x.pt", "optim.lr=0.05", "--config", "c.yaml", "run.name=b", "--ema"],
    ["bench", "--config", "c.yaml", "optim.lr=0.05", "--what", "loader", "run.name=b"],
    ["demo", "optim.lr=0.05", "--no-progress", "run.name=b"],
    ["config", "show", "optim.lr=0.05", "--config", "c.yaml", "run.name=b"],
])
def test_overrides_are_taken_anywhere_after_the_command_in_order(argv):
    from fastkd.cli import parse_args

    args = parse_args(argv)
    assert args.overrides == ["optim.lr=0.05", "run.name=b"]


def test_an_argument_that_is_neither_an_option_nor_an_override_is_refused(tiny_imagefolder, tmp_path, capsys):
    from fastkd.cli import parse_args

    config = write_config(tmp_path / "c.yaml", tiny_config_dict(tiny_imagefolder, tmp_path / "runs"))
    assert cli_error(capsys, "train", "--config", str(config), "--no-progress", "run.name=a", "optim.lr") == (
        "fastkd: error: override 'optim.lr': expected key=value, e.g. optim.lr=0.05")
    assert not (tmp_path / "runs").exists()
    with pytest.raises(SystemExit):
        parse_args(["report", "runs", "--out", "r.md", "optim.lr=1"])  # report takes no overrides
    assert "unrecognized arguments: optim.lr=1" in capsys.readouterr().err
