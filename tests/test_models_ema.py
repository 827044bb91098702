"""timm models, pretrained weights, per-model input normalization and the EMA of the weights."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest
import torch
import torchvision

from fastkd import commands, loop
from fastkd.checkpoint import load_checkpoint
from fastkd.cli import main
from fastkd.config import config_from_dict
from fastkd.ema import ModelEma, ema_decay_at
from fastkd.errors import CheckpointError, ConfigError
from fastkd.models import Normalization, attach_input_normalization, create_model, load_pretrained
from tests.conftest import cli_error, stop_after, tiny_config, tiny_config_dict, write_config


def test_without_timm_a_timm_arch_is_one_line_saying_how_to_install_it(monkeypatch):
    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm" or name.startswith("timm."):
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(ConfigError) as info:
        create_model("timm:resnet18", 10)
    assert str(info.value) == ("model.arch: timm models need the timm package: pip install timm (in a checkout of "
                               "fastkd: pip install -e '.[timm]'; from a package: 'fastkd[timm]')")


def test_timm_names_are_checked_with_a_suggestion():
    pytest.importorskip("timm")
    with pytest.raises(ConfigError, match=r"model.arch: 'resnet1' is not a timm model \(did you mean timm:resnet"):
        create_model("timm:resnet1", 10)
    model = create_model("timm:test_resnet", 7)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.slow
def test_a_timm_student_trains_evaluates_and_exports_with_its_timm_name(tiny_imagefolder, tmp_path, capsys):
    timm = pytest.importorskip("timm")
    cfg = tiny_config(tiny_imagefolder, tmp_path / "runs", model={"arch": "timm:test_resnet"},
                      optim={"epochs": 1, "warmup_epochs": 0})
    run = commands.train(cfg, progress=False).run_dir
    out = tmp_path / "export" / "student.pt"
    main(["export", str(run), "--out", str(out), "--onnx"])
    meta = json.loads(out.with_suffix(".json").read_text())
    # the model's own normalization (timm's pretrained config), recorded with the weights
    assert meta["arch"] == "timm:test_resnet" and meta["mean"] == list(timm.models.get_pretrained_cfg("test_resnet").mean)
    model = timm.create_model("test_resnet", num_classes=10)
    model.load_state_dict(torch.load(out, weights_only=True))  # loads as is, strictly
    config = write_config(tmp_path / "c.yaml", tiny_config_dict(tiny_imagefolder, tmp_path / "other"))
    capsys.readouterr()
    main(["eval", "--checkpoint", str(out), "--arch", "timm:test_resnet", "--config", str(config)])
    line = capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert line.startswith("timm:test_resnet ") and f"val top1 {summary['best_val_top1']:.2f}" in line


def test_pretrained_weights_initialize_all_but_a_classifier_for_other_classes(tmp_path):
    torch.manual_seed(0)
    imagenet = torchvision.models.resnet18(num_classes=1000)
    torch.save({"state_dict": {f"module.{k}": v for k, v in imagenet.state_dict().items()}}, tmp_path / "r18.pt")
    student = create_model("resnet18", 10)
    fresh_fc = student.fc.weight.clone()
    assert load_pretrained(student, str(tmp_path / "r18.pt"), arch="resnet18", num_classes=10) == ["fc.bias",
                                                                                                  "fc.weight"]
    for key, value in imagenet.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(student.state_dict()[key], value), key
    assert torch.equal(student.fc.weight, fresh_fc)
    same_classes = create_model("resnet18", 1000)
    assert load_pretrained(same_classes, str(tmp_path / "r18.pt"), arch="resnet18", num_classes=1000) == []
    assert torch.equal(same_classes.fc.weight, imagenet.fc.weight)
    with pytest.raises(CheckpointError, match=r"model.pretrained: .*r18.pt does not fit resnet34: \d+ key\(s\) "
                                              r"missing from the file \(layer1.2.conv1.weight"):
        load_pretrained(create_model("resnet34", 10), str(tmp_path / "r18.pt"), arch="resnet34", num_classes=10)
    with pytest.raises(ConfigError, match="model.pretrained: 'Nope_Weights.X' is not a torchvision weights name"):
        load_pretrained(student, "torchvision:Nope_Weights.X", arch="resnet18", num_classes=10)


def test_a_model_with_its_own_normalization_sees_the_batch_renormalized_its_way():
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 4, 3).eval()
    pixels = torch.rand(2, 3, 8, 8)
    imagenet = Normalization()
    own = Normalization((0.5, 0.5, 0.5), (0.25, 0.5, 1.0))

    def normalized(n: Normalization) -> torch.Tensor:
        return (pixels - torch.tensor(n.mean).view(1, 3, 1, 1)) / torch.tensor(n.std).view(1, 3, 1, 1)

    expected = model(normalized(own))
    hooked = attach_input_normalization(model, own)
    batch = normalized(imagenet).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(hooked(batch), expected, rtol=1e-5, atol=1e-6)
    assert not attach_input_normalization(torch.nn.Conv2d(3, 4, 3), imagenet)._forward_pre_hooks  # no cost


@pytest.mark.slow
def test_a_teacher_trained_with_other_statistics_is_fed_them_and_its_cache_keys_them(tiny_imagefolder, tmp_path,
                                                                                     capsys):
    own = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    teacher_cfg = tiny_config(tiny_imagefolder, tmp_path / "runs", run={"name": "teacher"}, model=own,
                              optim={"epochs": 1, "warmup_epochs": 0})
    teacher_run = commands.train(teacher_cfg, progress=False).run_dir
    assert load_checkpoint(teacher_run / "best.pt")["normalization"] == own
    from fastkd.models import load_teacher

    teacher = load_teacher("resnet18", teacher_run / "best.pt", load_checkpoint(teacher_run / "best.pt")["classes"],
                           image_size=32)
    assert teacher.fastkd_normalization.as_dict() == own and teacher._forward_pre_hooks
    raw = tiny_config_dict(tiny_imagefolder, tmp_path / "runs", run={"name": "kd"},
                           distill={"teacher": {"arch": "resnet18", "checkpoint": str(teacher_run / "best.pt")},
                                    "teacher_cache": str(tmp_path / "cache"), "allow_weak_teacher": True})
    commands.record_teacher_cache(config_from_dict(raw), dtype="fp32", progress=False)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["key"]["teacher_normalization"] == own
    raw["distill"]["teacher"].update(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    message = cli_error(capsys, "distill", "--config", str(write_config(tmp_path / "kd.yaml", raw)))
    assert "teacher_normalization differs" in message


def test_ema_decay_warms_up_as_timm_s_and_the_update_is_a_lerp():
    assert ema_decay_at(1, 0.999, warmup=True) == pytest.approx(1 - 2 ** (-2 / 3))
    assert ema_decay_at(10**9, 0.999, warmup=True) == 0.999 and ema_decay_at(1, 0.999, warmup=False) == 0.999
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEma(model, decay=0.9, warmup=False)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].num_batches_tracked.fill_(5)
    ema.update(1)
    now = model.state_dict()
    for key, value in ema.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.9 * before[key] + 0.1 * now[key])
        else:
            assert torch.equal(value, now[key])  # integer buffers are copied
    assert not any(p.requires_grad for p in ema.module.parameters())


@pytest.mark.slow
def test_ema_is_evaluated_each_epoch_saved_at_its_best_exported_and_resumed_exactly(tiny_imagefolder, tmp_path,
                                                                                    monkeypatch, capsys):
    sections = {"model": {"ema_decay": 0.9}, "runtime": {"device": "cpu", "deterministic": True}}
    straight = tiny_config(tiny_imagefolder, tmp_path / "a", **sections)
    summary = commands.train(straight, progress=False).summary
    run = tmp_path / "a" / "tiny"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("val_ema_top1" in r and "val_top1" in r for r in records)
    assert summary["best_ema_val_top1"] == max(r["val_ema_top1"] for r in records)
    best_ema = load_checkpoint(run / "best_ema.pt")
    assert best_ema["state"]["best_ema_top1"] == summary["best_ema_val_top1"]
    out = tmp_path / "ema.pt"
    main(["export", str(run), "--out", str(out), "--checkpoint", "best-ema"])
    exported = torch.load(out, weights_only=True)
    assert all(torch.equal(exported[k], best_ema["ema"][k]) for k in exported)
    assert not all(torch.equal(exported[k], best_ema["model"][k]) for k in exported)
    assert json.loads(out.with_suffix(".json").read_text())["weights"] == "ema"
    config = write_config(tmp_path / "eval.yaml", tiny_config_dict(tiny_imagefolder, tmp_path / "eval"))
    capsys.readouterr()
    main(["eval", "--checkpoint", str(run / "best_ema.pt"), "--ema", "--config", str(config)])
    assert capsys.readouterr().out.startswith(  # the EMA weights' own figure
        f"resnet18 {run / 'best_ema.pt'}: val top1 {summary['best_ema_val_top1']:.2f} ")

    interrupted = tiny_config(tiny_imagefolder, tmp_path / "b", **sections)
    with monkeypatch.context() as patch:
        stop_after(patch, 7)  # inside epoch 2
        with pytest.raises(loop.Interrupted):
            commands.train(interrupted, progress=False)
    commands.train(interrupted, resume=True, progress=False)
    a, b = load_checkpoint(run / "last.pt"), load_checkpoint(tmp_path / "b" / "tiny" / "last.pt")
    for key, value in a["ema"].items():
        assert torch.equal(value, b["ema"][key]), key


def test_a_model_of_one_input_size_trains_at_the_configured_size_or_is_refused_before_anything_is_written(
        tiny_imagefolder, tmp_path, capsys):
    """The registry says which models take one input size (timm ViTs by their pretrained config,
    torchvision's vit_*/maxvit_* by builder): built at the run's size they train; a size schedule or
    another validation size is one line naming the key, and no run directory appears."""
    pytest.importorskip("timm")
    raw = tiny_config_dict(tiny_imagefolder, tmp_path / "runs", model={"arch": "timm:vit_tiny_patch16_224"},
                           optim={"epochs": 1, "warmup_epochs": 0})
    config = write_config(tmp_path / "vit.yaml", raw)
    schedule = "data.size_schedule={start_image_size: 16, ramp_epochs: [0, 1], image_size_step: 16}"
    message = cli_error(capsys, "train", "--config", str(config), schedule)
    assert message == ("fastkd: error: model.arch: timm:vit_tiny_patch16_224 is built for one input size (32 px here): "
                       "it cannot train with data.size_schedule or be validated at data.val_image_size 32")
    message = cli_error(capsys, "train", "--config", str(config), "model.arch=vit_b_16", "data.val_image_size=48",
                        "data.val_resize=null")
    assert message.startswith("fastkd: error: model.arch: vit_b_16 is built for one input size (32 px here)")
    raw["distill"] = {"teacher": {"arch": "timm:vit_tiny_patch16_224", "checkpoint": "t.pt"}}
    raw["model"]["arch"] = "resnet18"
    message = cli_error(capsys, "distill", "--config", str(write_config(tmp_path / "kd.yaml", raw)), schedule)
    assert message.startswith("fastkd: error: distill.teacher.arch: timm:vit_tiny_patch16_224 is built for one input size")
    assert not (tmp_path / "runs").exists()
    summary = commands.train(config_from_dict(tiny_config_dict(
        tiny_imagefolder, tmp_path / "runs", model={"arch": "timm:vit_tiny_patch16_224"},
        optim={"epochs": 1, "warmup_epochs": 0})), progress=False).summary
    assert summary["epochs"] == 1 and summary["final_val_top1"] is not None  # trained and validated at 32 px


def test_model_families_are_asked_not_recognised_by_prefix():
    """The registry is the one place an arch's family is told from its name: a new family is one
    class in `fastkd.models.FAMILIES`."""
    import inspect

    import fastkd
    from fastkd.models import FAMILIES, TimmModels, TorchvisionModels, family_of, is_weights_name

    assert isinstance(family_of("resnet18"), TorchvisionModels) and isinstance(family_of("timm:vit_tiny_patch16_224"),
                                                                                 TimmModels)
    assert is_weights_name("timm") and is_weights_name("torchvision:ResNet18_Weights.IMAGENET1K_V1")
    assert not is_weights_name("runs/teacher/best.pt") and len(FAMILIES) == 2
    package = Path(inspect.getfile(fastkd)).parent
    for path in [*package.glob("*.py"), *(package.parent / "pipelines").glob("*.py")]:
        if path.name != "models.py":
            code = path.read_text()
            for needle in ("TIMM_PREFIX", 'startswith("timm', "startswith('timm", 'startswith("vit', "is_timm"):
                assert needle not in code, f"{path.name} tells a model family by its name ({needle})"
