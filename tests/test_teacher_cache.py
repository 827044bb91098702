"""Teacher cache: record the teacher's logits once, replay them exactly, refuse what does not fit."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from fastkd import commands, engine, loop
from fastkd.teacher import Teacher, teacher_cache_key
from fastkd.checkpoint import load_checkpoint
from fastkd.config import config_from_dict
from fastkd.errors import ConfigError
from fastkd.models import load_teacher
from fastkd.runtime import create_runtime, seed_everything
from fastkd.teacher_cache import CacheKey, CachedTeacher, TeacherCache
from fastkd.data import build_loaders, load_data
from tests.conftest import HOOKED_FASTKD, REPO, backend_data, cli_error, distill_dict, hooked_env, stop_after, write_config

pytestmark = pytest.mark.slow


def kd_raw(root: Path, out: Path, teacher: Path, cache: Path, **data) -> dict:
    raw = distill_dict(root, out, teacher)
    raw["distill"]["teacher_cache"] = str(cache)
    raw["data"].update(data)
    return raw


def record(raw: dict, *, epochs: int | None = None, dtype: str = "fp32") -> dict:
    return commands.record_teacher_cache(config_from_dict(raw), epochs=epochs, dtype=dtype, progress=False)


def online(raw: dict) -> dict:
    """The same run with the live teacher."""
    live = json.loads(json.dumps(raw))
    live["distill"]["teacher_cache"] = ""
    live["run"]["name"] = raw["run"]["name"] + "-online"
    return live


def live_teacher(cfg, checkpoint: Path):
    """The run's loaders and its teacher, prepared as a run prepares them (device, memory format,
    deterministic kernels)."""
    runtime = create_runtime(cfg.runtime)
    seed_everything(cfg.run.seed, deterministic=cfg.runtime.deterministic)
    loaders = build_loaders(cfg.data, spec=runtime.batch_spec, seed=cfg.data_seed, dataset=load_data(cfg.data))
    teacher = load_teacher("resnet18", checkpoint, loaders.classes, image_size=32)
    return loaders, runtime.prepare_model(teacher, trainable=False)[0]


@pytest.fixture(scope="module")
def random_teacher(tmp_path_factory) -> Path:
    """A freshly initialized ResNet-18 as a plain state_dict: logits of ordinary size (the tiny
    trained teacher's diverged to thousands, where fp16 keeps only a unit of precision)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("random-teacher") / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    return path


def test_logits_beyond_the_cache_dtype_are_refused_and_nothing_is_recorded(tiny_imagefolder, tmp_path, capsys):
    """An fp16 cache would keep an overflowing logit as inf, and every student replaying it would
    stop at a NaN loss (a teacher that diverged can produce such logits)."""

    torch.manual_seed(0)
    teacher = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        teacher.fc.weight.mul_(1e6)  # logits in the millions: finite in fp32, inf in fp16
    path = tmp_path / "loud.pt"
    torch.save(teacher.state_dict(), path)
    raw = kd_raw(tiny_imagefolder, tmp_path / "runs", path, tmp_path / "cache")
    config = write_config(tmp_path / "kd.yaml", raw)
    message = cli_error(capsys, "teacher-cache", "--config", str(config), "--epochs", "1", "--dtype", "fp16")
    assert message.startswith("fastkd: error: teacher cache: the teacher's logits reach ")
    assert "beyond fp16's range in epoch 0: record with --dtype fp32" in message
    assert not list((tmp_path / "cache").glob("*epoch*")) and not list((tmp_path / "cache").glob(".*.tmp*"))
    manifest = (tmp_path / "cache" / "manifest.json").read_text()
    assert record(raw, epochs=1, dtype="fp32")["recorded_now"] == [0]  # the hint works: nothing to delete
    assert np.isfinite(np.load(tmp_path / "cache" / "epoch-0000.npy")).all()
    assert json.loads(manifest)["dtype"] == "fp16" and '"fp32"' in (tmp_path / "cache" / "manifest.json").read_text()
    message = cli_error(capsys, "teacher-cache", "--config", str(config), "--epochs", "2", "--dtype", "fp16")
    assert "was recorded in fp32, not fp16" in message and "delete it" in message  # recorded epochs stay as they are
    again = record(raw, epochs=1, dtype="fp32")  # a matching cache is resumed, not started afresh
    assert again["recorded_now"] == [] and (tmp_path / "cache" / "epoch-0000.npy").is_file()


def test_a_teacher_with_non_finite_logits_is_refused_naming_its_precision(tiny_imagefolder, tmp_path, capsys):
    torch.manual_seed(0)
    teacher = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        teacher.fc.bias.fill_(float("nan"))
    path = tmp_path / "broken.pt"
    torch.save(teacher.state_dict(), path)
    config = write_config(tmp_path / "kd.yaml", kd_raw(tiny_imagefolder, tmp_path / "runs", path, tmp_path / "cache"))
    message = cli_error(capsys, "teacher-cache", "--config", str(config), "--epochs", "1", "--dtype", "fp32")
    assert "the teacher's logits are not finite (nan/inf) in epoch 0: its checkpoint is broken (its forward ran in " \
           "fp32); nothing of this epoch was recorded" in message
    assert not list((tmp_path / "cache").glob("*epoch*"))


def test_a_cache_with_no_recorded_epoch_starts_afresh_without_leftovers(tmp_path):
    """A recording refused (or killed before its manifest listed an epoch) leaves a manifest with
    no epochs, perhaps an epoch file it never listed, and temporary files: the next recording, with
    another dtype or teacher, replaces the manifest and clears the rest."""
    key = CacheKey(dataset="d" * 64, num_samples=8, classes=["a", "b"], seed=0, image_size=32, augmentation={},
                   teacher_arch="resnet18", teacher_checkpoint="c" * 64, teacher_precision="fp32")
    common = {"num_classes": 2, "teacher_val": {"val_top1": 50.0, "val_top5": 100.0}}
    TeacherCache.create_or_resume(tmp_path, key, dtype="fp16", **common)
    np.save(tmp_path / "epoch-0000.npy", np.zeros((8, 2), np.float16))  # renamed into place, never listed
    (tmp_path / ".manifest.json.tmp-4242").write_text("{")
    cache = TeacherCache.create_or_resume(tmp_path, key, dtype="fp32", **common)
    assert cache.manifest["dtype"] == "fp32" and cache.recorded_epochs == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
    again = TeacherCache.create_or_resume(tmp_path, key, dtype="fp32", **common)  # the same setup: kept as it is
    assert again.manifest == cache.manifest


def final_weights(raw: dict) -> dict[str, torch.Tensor]:
    return load_checkpoint(config_from_dict(raw).run_dir / "last.pt")["model"]


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_recorded_logits_equal_the_live_teachers_on_the_same_crops(tiny_imagefolder, tiny_teacher, tmp_path,  # noqa: F811
                                                                  backend):
    raw = kd_raw(tiny_imagefolder, tmp_path / "runs", tiny_teacher, tmp_path / "cache", **backend_data(backend))
    done = record(raw, epochs=2)
    assert done["recorded_now"] == [0, 1] and done["num_samples"] == 40
    cfg = config_from_dict(raw)
    loaders, teacher = live_teacher(cfg, tiny_teacher)
    cache = TeacherCache(tmp_path / "cache", json.loads((tmp_path / "cache" / "manifest.json").read_text()))
    seen = []
    for epoch in (0, 1):
        loaders.train.set_epoch(epoch)
        for batch in loaders.train:
            images, indices = batch.images, batch.indices
            with torch.no_grad():
                live = teacher(images)
            assert torch.equal(torch.from_numpy(cache.rows(epoch, indices.numpy())), live)
            seen += [(epoch, i) for i in indices.tolist()]
    assert sorted(seen) == [(e, i) for e in (0, 1) for i in range(40)]  # every sample of every epoch


def test_a_stop_during_an_epochs_last_batch_keeps_that_epoch(tiny_imagefolder, tiny_teacher, tmp_path,  # noqa: F811
                                                             monkeypatch):
    """A SIGTERM while the teacher runs the last batch of epoch 0: the epoch is whole, so it is
    committed, and the recording stops before epoch 1 instead of throwing epoch 0 away."""
    import os
    import signal

    from fastkd import teacher_cache_recorder

    raw = kd_raw(tiny_imagefolder, tmp_path / "runs", tiny_teacher, tmp_path / "cache", **backend_data("torchvision"))
    forward, calls = teacher_cache_recorder.frozen_forward, [0]

    def forward_then_stop(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 5:  # 40 samples in batches of 8: epoch 0's last batch
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(*args, **kwargs)

    monkeypatch.setattr(teacher_cache_recorder, "frozen_forward", forward_then_stop)
    with pytest.raises(loop.Interrupted) as stopped:
        record(raw, epochs=2)
    assert calls[0] == 5 and stopped.value.kept.endswith("with epochs 0-0")
    cache = TeacherCache(tmp_path / "cache", json.loads((tmp_path / "cache" / "manifest.json").read_text()))
    assert cache.recorded_epochs == [0]
    monkeypatch.setattr(teacher_cache_recorder, "frozen_forward", forward)
    assert record(raw, epochs=2)["recorded_now"] == [1]


MIXING = {"mix": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0}, "randaugment": {}}
"""The batch stage's transforms: RandAugment, then mixup or CutMix."""


@pytest.mark.parametrize("backend, mixing", [("torchvision", {}), ("dali", {}), ("torchvision", MIXING),
                                             ("dali", MIXING)])
def test_a_student_distilled_from_an_fp32_cache_ends_bit_identical_to_online_distillation(
        tiny_imagefolder, tiny_teacher, tmp_path, backend, mixing):  # noqa: F811
    """With RandAugment, mixup and CutMix too: the cache holds the teacher's logits of each mixed image."""
    raw = kd_raw(tiny_imagefolder, tmp_path / "runs", tiny_teacher, tmp_path / "cache", **backend_data(backend),
                 **mixing)
    record(raw, dtype="fp32")
    cached = commands.distill(config_from_dict(raw), progress=False).summary
    commands.distill(config_from_dict(online(raw)), progress=False)
    a, b = final_weights(raw), final_weights(online(raw))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert cached["teacher"]["cache"] == str(tmp_path / "cache")


def test_an_fp16_cache_differs_from_the_live_teacher_by_fp16_rounding_only(tiny_imagefolder, random_teacher,
                                                                          tmp_path):
    """fp16 storage is not bit-exact: each logit is rounded to 11 significant bits, nothing else.
    Training amplifies that rounding like any perturbation: on the tiny recipe the first epoch's
    loss moved by 1% at lr 1e-3 and by 1-3% at its lr 0.05, by an amount that changes whenever the
    random stream does. At lr 1e-4 the weights barely move and what is left is the rounding of the
    teacher's logits inside the loss (about 1e-6 of it). Bit-identical runs need --dtype fp32."""
    half = kd_raw(tiny_imagefolder, tmp_path / "runs", random_teacher, tmp_path / "cache-16")
    half["optim"]["lr"] = 1e-4
    full = kd_raw(tiny_imagefolder, tmp_path / "runs", random_teacher, tmp_path / "cache-32")
    record(half, dtype="fp16")
    record(full, dtype="fp32")
    for epoch in (0, 1):
        a = np.load(tmp_path / "cache-16" / f"epoch-{epoch:04d}.npy").astype(np.float64)
        b = np.load(tmp_path / "cache-32" / f"epoch-{epoch:04d}.npy").astype(np.float64)
        assert np.all(np.abs(a - b) <= np.abs(b) * 2.0**-11 + 2.0**-24) and not np.array_equal(a, b)
    commands.distill(config_from_dict(half), progress=False)
    commands.distill(config_from_dict(online(half)), progress=False)
    losses = [json.loads((config_from_dict(r).run_dir / "metrics.jsonl").read_text().splitlines()[0])["train_loss"]
              for r in (half, online(half))]
    assert abs(losses[0] - losses[1]) < 1e-4 * losses[1], losses


def test_replay_under_another_batch_size_reads_each_samples_row(tiny_imagefolder, tiny_teacher, tmp_path):  # noqa: F811
    """Recorded in batches of 7 (40 samples: the last 5 make a partial batch that training leaves
    out, data.drop_last), replayed in batches of 5: the recording holds every sample's row."""
    raw = kd_raw(tiny_imagefolder, tmp_path / "runs", tiny_teacher, tmp_path / "cache", batch_size=7)
    assert config_from_dict(raw).data.drop_last
    record(raw, epochs=2)
    other = kd_raw(tiny_imagefolder, tmp_path / "runs", tiny_teacher, tmp_path / "cache", batch_size=5)
    cfg = config_from_dict(other)
    loaders, teacher = live_teacher(cfg, tiny_teacher)
    cache = TeacherCache.open(tmp_path / "cache", teacher_cache_key(
        cfg, create_runtime(cfg.runtime), load_data(cfg.data), loaders.classes), epochs=2)
    step = engine.build_step(cfg, create_runtime(cfg.runtime), torchvision.models.shufflenet_v2_x0_5(num_classes=10),
                             Teacher(None, CachedTeacher(cache, torch.device("cpu")), {}))
    step.set_epoch(1)
    loaders.train.set_epoch(1)
    batches = list(loaders.train)
    assert [b.size for b in batches] == [5] * 8
    for batch in batches:
        with torch.no_grad():
            live = teacher(batch.images)  # another batch composition than when recorded: equal up to float rounding
        torch.testing.assert_close(step.teacher_outputs(batch.images, batch.indices).logits, live, rtol=1e-4,
                                   atol=1e-3)
        assert torch.isfinite(step(batch).loss)


def test_a_cached_distillation_resumes_exactly_and_only_with_its_own_cache(tiny_imagefolder, tiny_teacher,  # noqa: F811
                                                                           tmp_path, monkeypatch, capsys):
    raws = [kd_raw(tiny_imagefolder, tmp_path / name, tiny_teacher, tmp_path / "cache", **backend_data("dali"))
            for name in ("straight", "stopped")]
    record(raws[0])
    commands.distill(config_from_dict(raws[0]), progress=False)
    with monkeypatch.context() as patch:
        stop_after(patch, 7)  # inside epoch 2: the DALI pipeline is rebuilt at (1, 2) on resume
        with pytest.raises(loop.Interrupted):
            commands.distill(config_from_dict(raws[1]), progress=False)
    commands.distill(config_from_dict(raws[1]), resume=True, progress=False)
    a, b = final_weights(raws[0]), final_weights(raws[1])
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The same folder recorded again (in fp16 now) is other logits: a resume from it is refused.
    with monkeypatch.context() as patch:
        stop_after(patch, 7)
        stopped = kd_raw(tiny_imagefolder, tmp_path / "again", tiny_teacher, tmp_path / "cache")
        with pytest.raises(loop.Interrupted):
            commands.distill(config_from_dict(stopped), progress=False)
    shutil.rmtree(tmp_path / "cache")
    record(stopped, dtype="fp16")
    config = write_config(tmp_path / "kd.yaml", stopped)
    message = cli_error(capsys, "distill", "--config", str(config), "--resume")
    assert "was trained from other teacher logits than those in" in message


def test_a_mixed_cached_distillation_resumed_midway_ends_as_online_distillation(tiny_imagefolder, tiny_teacher,  # noqa: F811
                                                                                tmp_path, monkeypatch):
    raw = kd_raw(tiny_imagefolder, tmp_path / "runs", tiny_teacher, tmp_path / "cache", **MIXING)
    record(raw)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert [t["name"] for t in manifest["key"]["augmentation"]["batch_stage"]] == ["randaugment", "mix"]
    with monkeypatch.context() as patch:
        stop_after(patch, 7)  # inside epoch 2
        with pytest.raises(loop.Interrupted):
            commands.distill(config_from_dict(raw), progress=False)
    commands.distill(config_from_dict(raw), resume=True, progress=False)
    commands.distill(config_from_dict(online(raw)), progress=False)
    a, b = final_weights(raw), final_weights(online(raw))
    assert all(torch.equal(a[k], b[k]) for k in a)
    unmixed = online(raw)
    unmixed["run"]["name"] = "unmixed"
    unmixed["data"].update(mix=None, randaugment=None)
    commands.distill(config_from_dict(unmixed), progress=False)
    c = final_weights(unmixed)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the batches were mixed indeed


def torchrun(*args: str, **hooks: str) -> subprocess.CompletedProcess:
    program = [HOOKED_FASTKD] if hooks else ["-m", "fastkd"]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *program, *args, "--no-progress"], cwd=REPO, env=hooked_env(**hooks), capture_output=True,
                          text=True, timeout=300)


def test_two_processes_record_the_same_cache_and_replay_it_exactly(tiny_imagefolder, tiny_teacher, tmp_path):  # noqa: F811
    """Rank 0 alone opens the folder (another node need not see it), the other ranks record from
    its manifest: also when a second call extends the cache."""
    one = kd_raw(tiny_imagefolder, tmp_path / "runs", tiny_teacher, tmp_path / "cache-1", batch_size=4)
    record(one, epochs=3)
    two = kd_raw(tiny_imagefolder, tmp_path / "runs", tiny_teacher, tmp_path / "cache-2", batch_size=4)
    config = write_config(tmp_path / "two.yaml", two)
    for epochs in ("1", "3"):
        done = torchrun("teacher-cache", "--config", str(config), "--dtype", "fp32", "--epochs", epochs,
                        cache_on_rank_0_only="1")
        assert done.returncode == 0, done.stderr[-3000:]
    assert "epoch 1 recorded (epochs 0-1)" in done.stdout and "epoch 0 recorded" not in done.stdout
    for epoch in (0, 1, 2):  # each rank wrote its shard's rows: the same file as one process wrote
        name = f"epoch-{epoch:04d}.npy"
        assert np.array_equal(np.load(tmp_path / "cache-1" / name), np.load(tmp_path / "cache-2" / name))
    replay = torchrun("distill", "--config", str(config))
    assert replay.returncode == 0, replay.stderr[-3000:]
    live = write_config(tmp_path / "live.yaml", online(two))
    assert torchrun("distill", "--config", str(live)).returncode == 0
    a, b = final_weights(two), final_weights(online(two))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("change, expected", [
    ("run.seed=1", "seed differs (0 recorded, 1 now)"),
    ("data.image_size=30", "image_size differs (32 recorded, 30 now)"),
    ("distill.teacher.precision=bf16", "teacher_precision differs (fp32 recorded, bf16 now)"),
    ("optim.epochs=3", "holds epochs 0-1, the run needs epochs 0-2"),
    ("data.crop_scale=[0.35,1]", 'the augmentation differs: crop_area [0.08, 1.0] recorded, [0.35, 1.0] now'),
    ("data.mix.mixup_alpha=0.2", 'the augmentation differs: batch_stage "none" recorded, [{"name": "mix", "mixup_alpha": '
                             '0.2'),
    ("data.trivialaugment={}", 'the augmentation differs: batch_stage "none" recorded, [{"name": '
                                         '"trivialaugment"'),
])
def test_a_cache_that_does_not_fit_the_run_is_refused_before_anything_is_written(
        tiny_imagefolder, tiny_teacher, tmp_path, capsys, change, expected):  # noqa: F811
    raw = kd_raw(tiny_imagefolder, tmp_path / "runs", tiny_teacher, tmp_path / "cache")
    record(raw)
    config = write_config(tmp_path / "kd.yaml", raw)
    message = cli_error(capsys, "distill", "--config", str(config), change)
    assert message.startswith(f"fastkd: error: distill.teacher_cache: {tmp_path / 'cache'} ") and expected in message
    assert not (tmp_path / "runs").exists()


def test_another_teacher_or_dataset_is_named(tiny_imagefolder, tiny_teacher, tmp_path, capsys):  # noqa: F811
    raw = kd_raw(tiny_imagefolder, tmp_path / "runs", tiny_teacher, tmp_path / "cache")
    record(raw, epochs=2)
    other_teacher = tmp_path / "teacher.pt"
    payload = load_checkpoint(tiny_teacher)
    payload["model"]["fc.bias"] = payload["model"]["fc.bias"] + 1
    torch.save(payload, other_teacher)
    config = write_config(tmp_path / "kd.yaml", raw)
    message = cli_error(capsys, "distill", "--config", str(config), f"distill.teacher.checkpoint={other_teacher}")
    assert "the teacher checkpoint differs" in message
    data = tmp_path / "data"
    shutil.copytree(tiny_imagefolder, data)
    next((data / "train" / "cool_disc").iterdir()).unlink()
    message = cli_error(capsys, "distill", "--config", str(config), f"data.root={data}")
    assert "the training file list differs" in message
    assert not (tmp_path / "runs").exists()


def test_a_truncated_or_altered_epoch_file_is_an_error(tiny_imagefolder, tiny_teacher, tmp_path, capsys):  # noqa: F811
    raw = kd_raw(tiny_imagefolder, tmp_path / "runs", tiny_teacher, tmp_path / "cache")
    record(raw)
    epoch_file = tmp_path / "cache" / "epoch-0001.npy"
    data = bytearray(epoch_file.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the logits
    epoch_file.write_bytes(bytes(data))
    config = write_config(tmp_path / "kd.yaml", raw)
    assert "epoch-0001.npy is missing, truncated or altered" in cli_error(capsys, "distill", "--config", str(config))
    epoch_file.write_bytes(bytes(data[:-100]))
    assert "epoch-0001.npy is missing, truncated or altered" in cli_error(capsys, "distill", "--config", str(config))
    assert not (tmp_path / "runs").exists()
    (tmp_path / "cache" / "manifest.json").write_text("{ not json")
    assert "manifest.json is unreadable or corrupt" in cli_error(capsys, "distill", "--config", str(config))


def test_a_recording_stopped_midway_resumes_at_the_first_missing_epoch(tiny_imagefolder, tiny_teacher, tmp_path,  # noqa: F811
                                                                       monkeypatch):
    raw = kd_raw(tiny_imagefolder, tmp_path / "runs", tiny_teacher, tmp_path / "cache")
    commit = TeacherCache.commit_epoch

    def crash_at_epoch_1(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt  # killed after writing epoch 1's rows, before its rename
        commit(self, epoch)

    with monkeypatch.context() as patch:
        patch.setattr(TeacherCache, "commit_epoch", crash_at_epoch_1)
        with pytest.raises(KeyboardInterrupt):
            record(raw)
    assert (tmp_path / "cache" / ".epoch-0001.npy.tmp").exists()
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["epochs"].keys() == {"0"}
    assert record(raw)["recorded_now"] == [1]
    assert not list((tmp_path / "cache").glob(".*tmp*"))
    straight = kd_raw(tiny_imagefolder, tmp_path / "runs", tiny_teacher, tmp_path / "straight")
    record(straight)
    for name in ("epoch-0000.npy", "epoch-0001.npy"):
        assert (tmp_path / "cache" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()


def test_recording_into_a_cache_of_another_run_is_refused(tiny_imagefolder, tiny_teacher, tmp_path, capsys):  # noqa: F811
    raw = kd_raw(tiny_imagefolder, tmp_path / "runs", tiny_teacher, tmp_path / "cache")
    record(raw, epochs=1)
    config = write_config(tmp_path / "kd.yaml", raw)
    message = cli_error(capsys, "teacher-cache", "--config", str(config), "run.seed=5")
    assert message.startswith(f"fastkd: error: distill.teacher_cache: {tmp_path / 'cache'} holds a cache of another run")
    with pytest.raises(ConfigError, match="recorded in fp32, not fp16"):
        record(raw, epochs=2, dtype="fp16")


def test_bench_measures_cached_distillation(tiny_imagefolder, tmp_path, capsys):
    from fastkd.cli import main

    raw = kd_raw(tiny_imagefolder, tmp_path / "runs", tmp_path / "absent.pt", tmp_path / "cache")
    out = tmp_path / "bench.jsonl"
    main(["bench", "--config", str(write_config(tmp_path / "b.yaml", raw)), "--what", "distill-cached",
          "--backends", "torchvision", "--steps", "2", "--warmup", "1", "--repeats", "1", "--out", str(out)])
    rows = {r["what"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"train", "distill-cached"}  # the student alone on the same loader, for the ratio
    assert rows["distill-cached"]["teacher_cache"] and "cache lookup" in rows["distill-cached"]["stages"]
    assert "teacher forward" not in rows["distill-cached"]["stages"]
    assert "distill-cached" in capsys.readouterr().out


def test_teacher_cache_without_a_folder_or_distill_section_is_one_line(tiny_imagefolder, tmp_path, capsys):
    raw = distill_dict(tiny_imagefolder, tmp_path / "runs", tmp_path / "t.pt")
    message = cli_error(capsys, "teacher-cache", "--config", str(write_config(tmp_path / "kd.yaml", raw)))
    assert message == "fastkd: error: distill.teacher_cache: name the folder to record the teacher's logits into"


@pytest.mark.parametrize("problem", ["missing teacher", "bad --top-k", "bad --epochs"])
def test_a_refused_recording_writes_nothing(tiny_imagefolder, tiny_teacher, tmp_path, capsys, problem):  # noqa: F811
    teacher = tmp_path / "nope.pt" if problem == "missing teacher" else tiny_teacher
    config = write_config(tmp_path / "kd.yaml", kd_raw(tiny_imagefolder, tmp_path / "runs", teacher, tmp_path / "cache"))
    extra = {"missing teacher": [], "bad --top-k": ["--top-k", "0"], "bad --epochs": ["--epochs", "0"]}[problem]
    message = cli_error(capsys, "teacher-cache", "--config", str(config), *extra)
    expected = {"missing teacher": f"distill.teacher.checkpoint: checkpoint not found: {teacher}",
                "bad --top-k": "--top-k: must be >= 1, got 0", "bad --epochs": "--epochs: must be >= 1, got 0"}[problem]
    assert message == f"fastkd: error: {expected}"
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()
