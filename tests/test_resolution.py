"""Progressive resolution, a validation size of its own, and a teacher with its own input size
(one crop per sample, resized for the student and again for the teacher)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F

from fastkd import commands, loop
from fastkd.checkpoint import load_checkpoint
from fastkd.config import config_from_dict, load_config
from fastkd.data import build_loaders, dali_loader_values
from pipelines.augment import SizeSchedule
from tests.conftest import (CPU, GPU_SPEC, backend_data, cli_error, data_config, distill_dict, stop_after,
                            write_config)

HAVE_DALI = importlib.util.find_spec("nvidia.dali") is not None
BACKENDS = [("torchvision", {}), ("synthetic", {}),
            pytest.param("dali", {"dali": {"cpu_resize": "torch"}}, marks=pytest.mark.skipif(not HAVE_DALI, reason="no DALI")),
            pytest.param("dali", {"dali": {"cpu_resize": "dali"}}, marks=pytest.mark.skipif(not HAVE_DALI, reason="no DALI"))]
RAMP = dict(image_size=48, size_schedule={"start_image_size": 16, "ramp_epochs": (1, 3), "image_size_step": 16})
"""16 px up to epoch 1, 48 px from epoch 3: epochs 0-4 train at 16, 16, 32, 48, 48."""


def test_the_schedule_ramps_linearly_and_rounds_to_the_step():
    ramp = SizeSchedule(end=192, start=160, first=10, last=14, step=32)
    assert [ramp.at(e) for e in range(8, 17)] == [160, 160, 160, 160, 192, 192, 192, 192, 192]  # 168 -> 160, 176 -> 192
    assert [SizeSchedule(end=64, start=32, first=0, last=4, step=8).at(e) for e in range(6)] == [32, 40, 48, 56, 64, 64]
    assert {SizeSchedule(end=224).at(e) for e in range(100)} == {224}
    assert SizeSchedule(end=224).describe() == 224
    assert SizeSchedule(end=64, start=32, first=0, last=4, step=8).describe()["start"] == 32


@pytest.mark.parametrize("backend, extra", BACKENDS)
def test_every_backend_trains_at_the_epochs_size_and_validates_at_its_own(tiny_imagefolder, backend, extra):
    cfg = data_config(tiny_imagefolder, backend, batch_size=8, val_resize=None, val_image_size=56, **RAMP, **extra)
    loaders = build_loaders(cfg, spec=CPU, seed=0, teacher_image_size=40)
    sizes = []
    for epoch in range(5):
        loaders.train.set_epoch(epoch)
        batch = next(iter(loaders.train))
        images, labels, teacher_images = batch.images, batch.labels, batch.teacher_images
        sizes.append(images.shape[-1])
        assert images.shape[-2] == images.shape[-1] and images.is_contiguous(memory_format=torch.channels_last)
        assert teacher_images.shape == (len(labels), 3, 40, 40)  # the teacher's size does not follow the schedule
        assert teacher_images.is_contiguous(memory_format=torch.channels_last)
    assert sizes == [16, 16, 32, 48, 48]
    images = next(iter(loaders.val)).images
    assert images.shape[-2:] == (56, 56)
    assert cfg.val_resize_size == 64  # 8/7 of the crop, as 256 for 224


@pytest.mark.parametrize("backend, extra", [b for b in BACKENDS if "synthetic" not in str(b)])
def test_the_teachers_view_is_the_students_crop_at_another_size(tiny_imagefolder, backend, extra):
    """Resizing the teacher's 64 px view down to 24 px gives the student's 24 px batch, up to
    resampling rounding; a view of another sample would not."""
    cfg = data_config(tiny_imagefolder, backend, batch_size=8, image_size=24, val_resize=28, **extra)
    loader = build_loaders(cfg, spec=CPU, seed=3, teacher_image_size=64).train
    loader.set_epoch(1)
    for batch in loader:
        images, teacher_images = batch.images, batch.teacher_images
        down = F.interpolate(teacher_images, size=(24, 24), mode="bilinear", antialias=True, align_corners=False)
        matched = (down - images).abs().mean()
        shuffled = (down.roll(1, dims=0) - images).abs().mean()
        assert matched < 0.05 and matched < shuffled / 5, (matched, shuffled)


@pytest.mark.skipif(not HAVE_DALI, reason="no DALI")
@pytest.mark.parametrize("dali_device", ["gpu", "cpu"])
def test_gpu_graphs_resize_the_crop_twice_for_a_teacher_view(tiny_imagefolder, dali_device):
    from fastkd.data import load_data
    from pipelines.base import Shard
    from pipelines.dali_backend import DaliBatches, placement

    cfg = data_config(tiny_imagefolder, "dali", dali={"device": dali_device}, val_resize=None, **RAMP)
    dataset = load_data(cfg)
    place = placement(dali_device, GPU_SPEC, hw_decoder_load=0.65, files=dataset.train.files)
    loader = DaliBatches(dataset.train, train=True, batch_size=4, place=place, seed=0, shard=Shard(), spec=GPU_SPEC,
                         num_threads=1, teacher_size=40, build=False, **dali_loader_values(cfg))
    pipe = loader.create_pipeline(device_id=None)
    pipe.serialize()
    resizes = [str(op.spec) for op in pipe._ops if "OpSpec for Resize" in str(op.spec)]
    assert len(resizes) == 2 and all("device: gpu" in spec for spec in resizes)


def resolution_raw(root, out, teacher, backend: str, **distill) -> dict:
    raw = distill_dict(root, out, teacher, **distill)
    raw["data"].update(**backend_data(backend), num_workers=2, image_size=32, val_image_size=40, val_resize=None,
                       size_schedule={"start_image_size": 16, "ramp_epochs": [0, 1], "image_size_step": 16})
    raw["distill"]["teacher"]["image_size"] = 48
    return raw


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torchvision", pytest.param("dali", marks=pytest.mark.skipif(not HAVE_DALI,
                                                                                                   reason="no DALI"))])
def test_distillation_resumes_exactly_across_a_size_change(tiny_imagefolder, tiny_teacher, tmp_path, monkeypatch,  # noqa: F811
                                                           backend):
    """Epoch 0 trains at 16 px, epoch 1 at 32 px, the teacher at 48 px throughout; stopped inside
    epoch 1 and resumed, the student ends bit-identical to an uninterrupted run."""
    configs = {name: config_from_dict(resolution_raw(tiny_imagefolder, tmp_path / name, tiny_teacher, backend))
               for name in ("straight", "interrupted")}
    commands.distill(configs["straight"], progress=False)
    with monkeypatch.context() as patch:
        stop_after(patch, 7)  # inside epoch 1 (5 steps per epoch)
        with pytest.raises(loop.Interrupted):
            commands.distill(configs["interrupted"], progress=False)
    commands.distill(configs["interrupted"], resume=True, progress=False)
    a = load_checkpoint(configs["straight"].run_dir / "last.pt")
    b = load_checkpoint(configs["interrupted"].run_dir / "last.pt")
    assert a["step"] == b["step"] == 10
    assert all(torch.equal(value, b["model"][key]) for key, value in a["model"].items())
    for run in configs.values():  # the resumed run's log too: each epoch's line names its size
        lines = (run.run_dir / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["image_size"] for line in lines] == [16, 32]
    from fastkd.export import export_student

    meta = export_student(configs["straight"].run_dir, tmp_path / "student.pt")
    assert (meta["image_size"], meta["resize"]) == (40, 46)  # what it was tested at, for deployment


@pytest.mark.slow
def test_a_cache_of_the_teachers_view_serves_any_student_schedule(tiny_imagefolder, tiny_teacher, tmp_path, capsys):  # noqa: F811
    """The cache keeps the teacher's 48 px logits: a student replaying it ends bit-identical to
    online distillation with the same teacher view, whatever its own schedule; a cache of
    another teacher size is refused."""
    raw = resolution_raw(tiny_imagefolder, tmp_path / "runs", tiny_teacher, "torchvision",
                         teacher_cache=str(tmp_path / "cache"))
    commands.record_teacher_cache(config_from_dict(raw), dtype="fp32", progress=False)
    commands.distill(config_from_dict(raw), progress=False)
    live = json.loads(json.dumps(raw))
    live["distill"]["teacher_cache"], live["run"]["name"] = "", "online"
    commands.distill(config_from_dict(live), progress=False)
    a = load_checkpoint(config_from_dict(raw).run_dir / "last.pt")["model"]
    b = load_checkpoint(config_from_dict(live).run_dir / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    config = write_config(tmp_path / "kd.yaml", raw)
    other_schedule = ["data.size_schedule.start_image_size=32", "run.name=fixed32"]
    assert commands.distill(load_config(config, other_schedule), progress=False).summary["teacher"]["cache"]
    message = cli_error(capsys, "distill", "--config", str(config), "distill.teacher.image_size=40", "run.name=t40")
    assert "image_size differs (48 recorded, 40 now)" in message


def test_bench_measures_each_training_size_in_turn(tiny_imagefolder, tmp_path, capsys):
    from fastkd.cli import main
    from tests.conftest import tiny_config_dict

    raw = tiny_config_dict(tiny_imagefolder, tmp_path / "runs")
    raw["data"].update(size_schedule={"start_image_size": 16, "ramp_epochs": [0, 1], "image_size_step": 16},
                       val_resize=52)
    config = write_config(tmp_path / "bench.yaml", raw)
    out = tmp_path / "rows.jsonl"
    bench = ["bench", "--config", str(config), "--what", "loader,train", "--backends", "synthetic,torchvision",
             "--steps", "1", "--warmup", "1", "--repeats", "1", "--out", str(out)]
    main([*bench, "--image-sizes", "16,64"])  # 64: above the config's val_resize, which follows the size
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["what"], r["backend"], r["image_size"], r["batch_image_size"]) for r in rows] == [
        (what, backend, size, size) for size in (16, 64) for backend in ("synthetic", "torchvision")
        for what in ("loader", "train")]
    out.unlink()
    main(bench)  # without sizes: the schedule is left out, the rows say at which size they measured
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["image_size"], r["batch_image_size"]) for r in rows} == {(32, 32)}  # data.image_size, not 16
    assert "the size schedule is left out" in rows[0]["notes"][0]
    out.unlink()
    assert cli_error(capsys, *bench, "--image-sizes", "64,8").startswith("fastkd: error: data.image_size")
    assert not out.exists()  # a bad size is refused before any size runs
    assert cli_error(capsys, "bench", "--config", str(config), "--image-sizes", "big") == \
        "fastkd: error: --image-sizes: expected a comma list of pixel sizes, got 'big'"
