"""Top-k teacher caches: K logits and a rest logit per (epoch, sample), rebuilt for every loss."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fastkd import commands
from fastkd.config import config_from_dict
from fastkd.errors import ConfigError, DataError
from fastkd.losses import kd_loss
from fastkd.teacher_cache import (CacheKey, CachedTeacher, TeacherCache, decode_top_k, encode_top_k,
                                  row_dtype)
from tests.conftest import cli_error, distill_dict, write_config


def _logits(rows: int = 64, classes: int = 100) -> torch.Tensor:
    return torch.randn(rows, classes, generator=torch.Generator().manual_seed(0)) * 3


@pytest.mark.parametrize("k", [1, 5, 37])
def test_rebuilt_logits_keep_the_top_k_probabilities_and_the_rest_s_total_mass_at_t_1(k):
    logits = _logits()
    indices, values = encode_top_k(logits, k)
    rebuilt = decode_top_k(indices, values, logits.shape[1])
    p, q = logits.softmax(1), rebuilt.softmax(1)
    top = p.topk(k, dim=1)
    assert torch.equal(indices, top.indices)
    torch.testing.assert_close(q.gather(1, indices), top.values, rtol=1e-5, atol=1e-7)
    rest = torch.ones_like(p, dtype=torch.bool).scatter_(1, indices, False)
    torch.testing.assert_close((q * rest).sum(1), (p * rest).sum(1), rtol=1e-5, atol=1e-7)
    # the rest's mass is spread evenly; the teacher's top-1 is kept
    spread = q.masked_select(rest).view(len(q), -1)
    torch.testing.assert_close(spread, spread[:, :1].expand_as(spread))
    assert torch.equal(rebuilt.argmax(1), logits.argmax(1))


def test_at_other_temperatures_the_top_k_keep_their_ratios_and_kd_is_approximated():
    logits, student = _logits(), _logits() * 0.5 + 1
    indices, values = encode_top_k(logits, 5)
    rebuilt = decode_top_k(indices, values, logits.shape[1])
    p, q = (logits / 4).softmax(1).gather(1, indices), (rebuilt / 4).softmax(1).gather(1, indices)
    torch.testing.assert_close(p / p[:, :1], q / q[:, :1], rtol=1e-5, atol=1e-7)
    assert not torch.equal(kd_loss(student, logits, 4.0), kd_loss(student, rebuilt, 4.0))  # approximate at T=4


def test_at_t_1_the_kd_gradient_on_the_kept_classes_is_exact():
    """d KL(p || q) / d s = (q - p) / B: on the K kept classes p is exact, so the gradient is."""
    logits, student = _logits(), (_logits() * 0.5 + 1).requires_grad_()
    indices, values = encode_top_k(logits, 5)
    rebuilt = decode_top_k(indices, values, logits.shape[1])
    exact, = torch.autograd.grad(kd_loss(student, logits, 1.0), student)
    approximate, = torch.autograd.grad(kd_loss(student, rebuilt, 1.0), student)
    torch.testing.assert_close(approximate.gather(1, indices), exact.gather(1, indices), rtol=1e-4, atol=1e-7)
    assert not torch.allclose(approximate, exact)  # elsewhere the rest's mass is spread evenly


@pytest.mark.gpu
def test_a_top_k_cache_replays_on_the_gpu_through_pinned_memory(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    key, logits = _key(), _logits(16)
    cache = TeacherCache.create_or_resume(tmp_path / "c", key, dtype="fp16", top_k=5, num_classes=100,
                                          teacher_val={"val_top1": 50.0, "val_top5": 90.0})
    rows = cache.new_epoch_file(0)
    cache.write_rows(rows, np.arange(16), logits)
    rows.flush()
    del rows
    cache.commit_epoch(0)
    opened = TeacherCache.open(tmp_path / "c", key, epochs=1, top_k=5)
    indices = torch.tensor([5, 1, 9])
    got, _ = CachedTeacher(opened, torch.device("cuda"))(indices)
    torch.cuda.synchronize()
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), CachedTeacher(opened, torch.device("cpu"))(indices)[0])


def test_a_cache_recorded_before_top_k_and_normalization_keys_still_replays(tmp_path):
    key, logits = _key(), _logits(16)
    cache = TeacherCache.create_or_resume(tmp_path / "c", key, dtype="fp32", num_classes=100,
                                          teacher_val={"val_top1": 50.0, "val_top5": 90.0})
    rows = cache.new_epoch_file(0)
    cache.write_rows(rows, np.arange(16), logits)
    rows.flush()
    del rows
    cache.commit_epoch(0)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    del manifest["top_k"], manifest["key"]["teacher_normalization"]  # as fastkd wrote them before
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    opened = TeacherCache.open(tmp_path / "c", key, epochs=1)
    assert opened.top_k is None
    assert torch.equal(CachedTeacher(opened, torch.device("cpu"))(torch.tensor([2, 7]))[0], logits[[2, 7]])


def test_a_top_k_row_is_packed_and_small():
    assert row_dtype(1000, "fp16", 5).itemsize == 5 * 2 + 6 * 2  # int16 indices, fp16 logits and the rest
    assert row_dtype(40000, "fp16", 5).itemsize == 5 * 4 + 6 * 2  # more classes than int16 holds
    assert row_dtype(1000, "fp16", None).itemsize == 2  # a full row is 1000 of these


def _key(num_samples: int = 16, classes: int = 100) -> CacheKey:
    return CacheKey(dataset="d" * 64, num_samples=num_samples, classes=[f"c{i}" for i in range(classes)], seed=0,
                    image_size=32, augmentation={}, teacher_arch="resnet18", teacher_checkpoint="c" * 64,
                    teacher_precision="fp32")


def test_a_top_k_epoch_replays_the_rebuilt_logits_and_is_checked_like_a_full_one(tmp_path):
    key, logits = _key(), _logits(16)
    common = {"num_classes": 100, "teacher_val": {"val_top1": 50.0, "val_top5": 90.0}}
    cache = TeacherCache.create_or_resume(tmp_path / "c", key, dtype="fp32", top_k=5, **common)
    rows = cache.new_epoch_file(0)
    order = np.random.default_rng(0).permutation(16)
    for part in np.array_split(order, 3):  # written batch by batch, in the stream's order
        cache.write_rows(rows, part, logits[torch.from_numpy(part)])
    rows.flush()
    del rows
    cache.commit_epoch(0)
    assert (tmp_path / "c" / "epoch-0000.npy").stat().st_size < 16 * (5 * 2 + 6 * 4) + 200  # rows + .npy header
    opened = TeacherCache.open(tmp_path / "c", key, epochs=1, top_k=5)
    got, _ = CachedTeacher(opened, torch.device("cpu"))(torch.tensor([3, 0, 15]))
    expected = decode_top_k(*encode_top_k(logits[[3, 0, 15]], 5), 100)
    assert torch.equal(got, expected)
    with pytest.raises(ConfigError, match=r"holds the top-5 logits of the teacher, the run expects every logit "
                                          r"\(distill.teacher_cache_top_k: null\); set distill.teacher_cache_top_k=5"):
        TeacherCache.open(tmp_path / "c", key, epochs=1)
    with pytest.raises(ConfigError, match=r"--top-k: .* holds the top-5 logits \(epochs 0-0\), not every logit"):
        TeacherCache.create_or_resume(tmp_path / "c", key, dtype="fp32", **common)
    full = TeacherCache.create_or_resume(tmp_path / "full", key, dtype="fp32", **common)
    assert full.top_k is None
    (tmp_path / "c" / "epoch-0000.npy").write_bytes((tmp_path / "c" / "epoch-0000.npy").read_bytes()[:-8])
    with pytest.raises(DataError, match="missing, truncated or altered"):
        TeacherCache.open(tmp_path / "c", key, epochs=1, top_k=5)


def test_dkd_with_a_top_1_cache_is_refused_in_one_line():
    raw = {"data": {"root": "/d"}, "distill": {"teacher": {"arch": "resnet18", "checkpoint": "t.pt"}, "loss": "dkd",
                                               "teacher_cache": "c", "teacher_cache_top_k": 1}}
    with pytest.raises(ConfigError, match="distill.teacher_cache_top_k: 1 leaves dkd none of the teacher's "
                                          "non-target classes"):
        config_from_dict(raw)
    live = {"data": raw["data"], "distill": {**raw["distill"], "loss": "kd", "teacher_cache": ""}}
    with pytest.raises(ConfigError, match="distill.teacher_cache_top_k: is set without distill.teacher_cache"):
        config_from_dict(live)
    raw["distill"]["teacher_cache_top_k"] = 2
    assert config_from_dict(raw).distill.teacher_cache_top_k == 2


@pytest.mark.slow
def test_recorded_top_k_cache_trains_a_student_and_a_full_replay_of_it_is_refused(
        tiny_imagefolder, tiny_teacher, tmp_path, capsys):  # noqa: F811
    raw = distill_dict(tiny_imagefolder, tmp_path / "runs", tiny_teacher)
    raw["distill"]["teacher_cache"] = str(tmp_path / "cache")
    config = write_config(tmp_path / "kd.yaml", raw)
    from fastkd.cli import main

    main(["teacher-cache", "--config", str(config), "--top-k", "3", "--dtype", "fp32"])
    assert "the top-3 logits" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["top_k"] == 3 and sorted(manifest["epochs"]) == ["0", "1"]
    message = cli_error(capsys, "distill", "--config", str(config))
    assert "set distill.teacher_cache_top_k=3 to replay it" in message and not (tmp_path / "runs").exists()
    summary = commands.distill(config_from_dict({**raw, "distill": {**raw["distill"], "teacher_cache_top_k": 3}}),
                             progress=False).summary
    assert math.isfinite(summary["best_val_top1"]) and summary["teacher"]["cache"] == str(tmp_path / "cache")
    # --top-k at or above the number of classes records every logit
    raw["distill"]["teacher_cache"] = str(tmp_path / "all")
    main(["teacher-cache", "--config", str(write_config(tmp_path / "all.yaml", raw)), "--top-k", "10"])
    assert "keeps all 10 classes: recording every logit" in capsys.readouterr().out
    assert json.loads((tmp_path / "all" / "manifest.json").read_text())["top_k"] is None
