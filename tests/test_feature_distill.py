"""Feature distillation (timm's pooled pre-logit features through a learned projection), FitNets
hints, token distillation for models with a distillation head, logit standardization, and the
teacher cache recording and replaying the teacher's pooled features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from fastkd import commands, engine, loop
from fastkd.checkpoint import load_checkpoint
from fastkd.config import config_from_dict
from fastkd.metrics import Meter, NonFiniteGuard
from fastkd.runtime import create_runtime
from fastkd.teacher_cache import TeacherCache
from tests.conftest import backend_data, cli_error, distill_dict, stop_after, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def random_teacher(tmp_path_factory) -> Path:
    """A freshly initialized ResNet-18 as a plain state_dict: logits and features of ordinary size."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("random-teacher") / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    return path


def feature_dict(root: Path, out: Path, teacher: Path, name: str, **distill) -> dict:
    """ShuffleNet-v2 x0.5 (pooled width 1024) distilled from a ResNet-18 (512): a projection."""
    raw = distill_dict(root, out, teacher, **distill)
    raw["run"]["name"] = name
    return raw


def weights(raw: dict, key: str = "model") -> dict[str, torch.Tensor]:
    return load_checkpoint(config_from_dict(raw).run_dir / "last.pt")[key]


def test_the_projection_trains_with_the_student_and_is_saved_apart_from_it(tiny_imagefolder, random_teacher, tmp_path):
    """widths 1024 -> 512: a Linear projection, in the optimizer (it moves with the first step),
    in the checkpoint as `distill_heads`, never in the student's weights or its export."""
    raw = feature_dict(tiny_imagefolder, tmp_path / "runs", random_teacher, "feature", feature={"weight": 2.0})
    cfg = config_from_dict(raw)
    run = engine.build_run(cfg, create_runtime(cfg.runtime))
    assert run.student is not None and run.step is not None and run.update is not None
    projection = run.student.heads.projection
    assert isinstance(projection, torch.nn.Linear) and (projection.in_features, projection.out_features) == (1024, 512)
    before = projection.weight.detach().clone()
    run.loaders.train.set_epoch(0)
    run.step.set_epoch(0)
    batch = next(iter(run.loaders.train))
    out = loop.train_step(run.step, run.update, batch, Meter(torch.device("cpu")), NonFiniteGuard(torch.device("cpu")), 1)
    assert set(out.parts) == {"ce", "kd", "feature", "agree"} and out.parts["feature"] > 0
    assert not torch.equal(projection.weight, before)  # trained with the student
    summary = commands.distill(cfg, progress=False).summary
    assert summary["epochs"] == 2
    checkpoint = load_checkpoint(cfg.run_dir / "last.pt")
    assert set(checkpoint["distill_heads"]) == {"projection.weight", "projection.bias"}
    assert set(checkpoint["model"]) == set(torchvision.models.shufflenet_v2_x0_5(num_classes=10).state_dict())
    out_path = tmp_path / "export" / "student.pt"
    from fastkd.cli import main

    main(["export", str(cfg.run_dir), "--out", str(out_path)])
    torchvision.models.shufflenet_v2_x0_5(num_classes=10).load_state_dict(torch.load(out_path, weights_only=True))


def test_feature_distillation_alone_computes_no_logit_term(tiny_imagefolder, random_teacher, tmp_path):
    raw = feature_dict(tiny_imagefolder, tmp_path / "runs", random_teacher, "alone", feature={})
    del raw["distill"]["alpha"]
    raw["distill"].update(kd_weight=0.0, ce_weight=1.0)
    commands.distill(config_from_dict(raw), progress=False)
    record = json.loads((config_from_dict(raw).run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert "train_feature" in record and "train_kd" not in record


def test_a_feature_distillation_resumes_exactly_projection_included(tiny_imagefolder, random_teacher, tmp_path,
                                                                     monkeypatch):
    straight = feature_dict(tiny_imagefolder, tmp_path / "a", random_teacher, "straight", feature={},
                            hint={"student_layer": "stage3", "teacher_layer": "layer3"})
    stopped = feature_dict(tiny_imagefolder, tmp_path / "b", random_teacher, "stopped", feature={},
                           hint={"student_layer": "stage3", "teacher_layer": "layer3"})
    commands.distill(config_from_dict(straight), progress=False)
    with monkeypatch.context() as patch:
        stop_after(patch, 7)  # inside epoch 2
        with pytest.raises(loop.Interrupted):
            commands.distill(config_from_dict(stopped), progress=False)
    commands.distill(config_from_dict(stopped), resume=True, progress=False)
    for key in ("model", "distill_heads"):
        a, b = weights(straight, key), weights(stopped, key)
        assert set(a) == {"projection.weight", "projection.bias", "adapter.weight"} if key == "distill_heads" else True
        assert all(torch.equal(a[k], b[k]) for k in a), key


def test_a_hint_layer_that_does_not_exist_is_one_line_listing_the_candidates(tiny_imagefolder, random_teacher,
                                                                              tmp_path, capsys):
    raw = feature_dict(tiny_imagefolder, tmp_path / "runs", random_teacher, "hint",
                       hint={"student_layer": "stage9", "teacher_layer": "layer3"})
    message = cli_error(capsys, "distill", "--config", str(write_config(tmp_path / "kd.yaml", raw)))
    assert message.startswith("fastkd: error: distill.hint.student_layer: 'stage9' is not a module of the model (did "
                              "you mean stage4?); its modules: conv1, conv1.0,")
    assert "stage3, stage3.0," in message and not (tmp_path / "runs").exists()
    raw["distill"]["teacher_cache"] = str(tmp_path / "cache")
    raw["distill"]["hint"]["student_layer"] = "stage3"
    assert cli_error(capsys, "distill", "--config", str(write_config(tmp_path / "kd.yaml", raw))) == (
        "fastkd: error: distill.hint: needs the live teacher: its intermediate feature maps are too big to cache "
        "(remove distill.teacher_cache, or distill.hint)")


def record(raw: dict, **kwargs) -> dict:
    return commands.record_teacher_cache(config_from_dict(raw), progress=False, **kwargs)


def online(raw: dict) -> dict:
    live = json.loads(json.dumps(raw))
    live["distill"]["teacher_cache"] = ""
    live["run"]["name"] += "-online"
    return live


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_a_cache_of_features_replays_them_per_epoch_and_sample(tiny_imagefolder, random_teacher, tmp_path, backend):
    """Each recorded row is the live teacher's pooled features of that sample's crop in that epoch
    (another epoch's crops give other features); the logits' rows are there too."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    raw = feature_dict(tiny_imagefolder, tmp_path / "runs", random_teacher, "cached", feature={},
                       teacher_cache=str(tmp_path / "cache"))
    raw["data"].update(backend_data(backend))
    done = record(raw, epochs=2, dtype="fp32")
    assert done["recorded_now"] == [0, 1]
    cache = TeacherCache(tmp_path / "cache", json.loads((tmp_path / "cache" / "manifest.json").read_text()))
    assert cache.feature_width == 512 and cache.key.features is not None
    cfg = config_from_dict(online(raw))
    run = engine.build_run(cfg, create_runtime(cfg.runtime), student="none", teacher="live")
    teacher = run.teacher
    for epoch in (0, 1):
        run.loaders.train.set_epoch(epoch)
        for batch in run.loaders.train:
            with torch.no_grad():
                logits = teacher.module(batch.images)
            features, _ = teacher.taps.take()
            index = batch.sample_indices()
            assert torch.equal(torch.from_numpy(np.asarray(cache.epoch_features(epoch)[index])), features)
            assert torch.equal(torch.from_numpy(cache.rows(epoch, index)), logits)
            other = np.asarray(cache.epoch_features(1 - epoch)[index])
            assert not np.array_equal(other, features.numpy())  # the other epoch's crops: other features


@pytest.mark.parametrize("top_k", [None, 3])
def test_a_student_distilled_from_an_fp32_cache_of_features_ends_bit_identical_to_online(
        tiny_imagefolder, random_teacher, tmp_path, monkeypatch, top_k):
    """feature + kd, replayed from the cache and stopped mid-epoch then resumed, against the live
    teacher; a top-k cache keeps every feature (its logits rebuilt from the top-k)."""
    raw = feature_dict(tiny_imagefolder, tmp_path / "runs", random_teacher, "cached", feature={},
                       teacher_cache=str(tmp_path / "cache"))
    record(raw, dtype="fp32", top_k=top_k)
    if top_k is not None:
        raw["distill"]["teacher_cache_top_k"] = top_k
        commands.distill(config_from_dict(raw), progress=False)
        assert weights(raw, "distill_heads")  # replayed: the features were there
        return
    with monkeypatch.context() as patch:
        stop_after(patch, 7)
        with pytest.raises(loop.Interrupted):
            commands.distill(config_from_dict(raw), progress=False)
    commands.distill(config_from_dict(raw), resume=True, progress=False)
    commands.distill(config_from_dict(online(raw)), progress=False)
    for key in ("model", "distill_heads"):
        a, b = weights(raw, key), weights(online(raw), key)
        assert all(torch.equal(a[k], b[k]) for k in a), key


def test_a_cache_without_features_is_refused_by_a_run_that_needs_them(tiny_imagefolder, random_teacher, tmp_path,
                                                                       capsys):
    raw = feature_dict(tiny_imagefolder, tmp_path / "runs", random_teacher, "cached",
                       teacher_cache=str(tmp_path / "cache"))
    record(raw, epochs=2, dtype="fp32")
    config = write_config(tmp_path / "kd.yaml", raw)
    message = cli_error(capsys, "distill", "--config", str(config), "distill.feature={}")
    assert message == (f"fastkd: error: distill.teacher_cache: {tmp_path / 'cache'} was recorded for another run: the "
                       "teacher's pooled features were not recorded, and distill.feature needs them (record a cache "
                       "with distill.feature set)")
    message = cli_error(capsys, "teacher-cache", "--config", str(config), "distill.feature={}")
    assert "it was recorded without the teacher's pooled features, this recording with" in message
    assert not (tmp_path / "runs").exists()


def test_a_cache_of_features_also_serves_a_run_of_logits_alone(tiny_imagefolder, random_teacher, tmp_path):
    raw = feature_dict(tiny_imagefolder, tmp_path / "runs", random_teacher, "cached", feature={},
                       teacher_cache=str(tmp_path / "cache"))
    record(raw, dtype="fp32")
    del raw["distill"]["feature"]
    assert commands.distill(config_from_dict(raw), progress=False).summary["teacher"]["cache"]


@pytest.mark.parametrize("hard", [False, True])
def test_token_distillation_trains_both_heads_of_a_distilled_vit(tiny_imagefolder, random_teacher, tmp_path, hard):
    pytest.importorskip("timm")
    raw = feature_dict(tiny_imagefolder, tmp_path / "runs", random_teacher, "token", token={"hard": hard})
    raw["model"]["arch"] = "timm:deit_tiny_distilled_patch16_224"
    raw["optim"].update(epochs=1, warmup_epochs=0)
    cfg = config_from_dict(raw)
    run = engine.build_run(cfg, create_runtime(cfg.runtime))
    run.loaders.train.set_epoch(0)
    run.step.set_epoch(0)
    run.step.train()
    batch = next(iter(run.loaders.train))
    heads = run.student.raw.head, run.student.raw.head_dist
    grads = []
    for head in heads:
        head.weight.grad = None
    out = run.step(batch)
    out.loss.backward()
    grads = [head.weight.grad for head in heads]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)  # the class head (labels), the distillation head
    summary = commands.distill(cfg, progress=False).summary
    assert summary["epochs"] == 1 and summary["final_val_top1"] is not None


def test_token_distillation_needs_a_distillation_head(tiny_imagefolder, random_teacher, tmp_path, capsys):
    raw = feature_dict(tiny_imagefolder, tmp_path / "runs", random_teacher, "token", token={})
    message = cli_error(capsys, "distill", "--config", str(write_config(tmp_path / "kd.yaml", raw)))
    assert message == ("fastkd: error: distill.token: model.arch shufflenet_v2_x0_5 has no distillation head (a timm "
                       "*_distilled model has one, e.g. timm:deit_tiny_distilled_patch16_224)")


@pytest.mark.parametrize("distill, message", [
    ({"feature": {"weight": 0}}, "distill.feature.weight: must be > 0 (remove distill.feature to turn it off), got 0.0"),
    ({"feature": {"weigth": 1}}, "distill.feature.weigth: unknown key (did you mean distill.feature.weight?)"),
    ({"hint": {"student_layer": "layer3"}}, "distill.hint.teacher_layer: is required"),
    ({"hint": {"student_layer": "", "teacher_layer": "layer3"}}, "distill.hint.student_layer: must name a module of "
                                                                 "the model"),
    ({"hint": {"student_layer": "a", "teacher_layer": "b", "weight": -1}}, "distill.hint.weight: must be > 0"),
    ({"token": {"hard": True}, "logit_standardization": True}, "distill.logit_standardization: has no effect with "
                                                               "distill.token.hard"),
    ({"token": {}, "feature": {}}, "distill.token: cannot be combined with distill.feature or distill.hint"),
    ({"logit_standardization": "yes"}, "distill.logit_standardization: expected true or false, got str 'yes'"),
    ({"kd_weight": 0, "ce_weight": 0}, "distill.kd_weight: kd_weight and ce_weight cannot both be 0 without "
                                       "distill.feature or distill.hint"),
])
def test_feature_distillation_settings_that_cannot_work_are_one_line_each(tmp_path, distill, message):
    from fastkd.errors import ConfigError

    raw = distill_dict(tmp_path, tmp_path / "runs", tmp_path / "t.pt")
    del raw["distill"]["alpha"]
    raw["distill"].update(distill)
    with pytest.raises(ConfigError) as error:
        config_from_dict(raw)
    assert str(error.value).startswith(message)
