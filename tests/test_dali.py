"""The DALI backend on its CPU path (GPU-only checks are marked `gpu`)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastkd.errors import CheckpointError, ConfigError, DataError
from fastkd.data import build_loaders, dali_loader_values, load_data
from pipelines.augment import epoch_order
from pipelines.base import BatchSpec, Shard, check_batch
from tests.conftest import CPU, GPU_SPEC, REPO, data_config, hooked_env, pairs

if importlib.util.find_spec("nvidia.dali") is None:  # not installed: skip; installed but broken: fail
    pytest.skip("NVIDIA DALI is not installed", allow_module_level=True)

from pipelines.dali_backend import DaliBatches, placement, resolve_dali_device, size_hints  # noqa: E402

# Measured on the demo images (64/73, 224/256 px): mean |difference| 0.0015-0.003 in normalized
# units (about 0.1-0.2 grey levels). Decoders and resampling filters differ in rounding only.
VAL_MEAN_ABS_TOLERANCE = 0.01
VAL_PIXEL_P999_TOLERANCE = 0.1


def stream(loader, epochs: int) -> list[tuple[list[int], float]]:
    out = []
    for _ in range(epochs):
        for images, labels in pairs(loader):
            out.append((labels.tolist(), float(images.double().sum())))
    return out


@pytest.mark.parametrize("size, resize", [(32, 36), (60, 60), (56, 64)])
def test_dali_cpu_and_torchvision_validation_batches_agree(tiny_imagefolder, size, resize):
    batches = {}
    for backend in ("torchvision", "dali"):
        cfg = data_config(tiny_imagefolder, backend, image_size=size, val_resize=resize, val_batch_size=20)
        images, labels = next(pairs(build_loaders(cfg, spec=CPU, seed=0).val))
        batches[backend] = (images, labels)
    assert torch.equal(batches["torchvision"][1], batches["dali"][1])
    difference = (batches["torchvision"][0] - batches["dali"][0]).abs()
    assert difference.mean() < VAL_MEAN_ABS_TOLERANCE
    assert difference.flatten().quantile(0.999) < VAL_PIXEL_P999_TOLERANCE


def test_training_stream_is_seeded_and_reshuffled_every_epoch(tiny_imagefolder):
    cfg = data_config(tiny_imagefolder, "dali", drop_last=False)  # every sample in both epochs
    first = stream(build_loaders(cfg, spec=CPU, seed=0).train, 2)
    again = stream(build_loaders(cfg, spec=CPU, seed=0).train, 2)
    other = stream(build_loaders(cfg, spec=CPU, seed=1).train, 1)
    assert first == again
    per_epoch = len(first) // 2
    epoch0 = sum((labels for labels, _ in first[:per_epoch]), [])
    epoch1 = sum((labels for labels, _ in first[per_epoch:]), [])
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1  # whole-list reshuffle
    assert other != first[:per_epoch]


@pytest.mark.parametrize("epochs_before, batches_before", [(0, 3), (1, 0), (1, 4)])
def test_training_stream_resumes_exactly_at_any_epoch_and_batch(tiny_imagefolder, epochs_before, batches_before):
    """The stream is a pure function of (seed, epoch, batch): a new loader set to a position
    yields exactly what an uninterrupted one yields from there (nothing else is saved)."""
    cfg = data_config(tiny_imagefolder, "dali")
    full = stream(build_loaders(cfg, spec=CPU, seed=0).train, 3)
    resumed = build_loaders(cfg, spec=CPU, seed=0).train
    assert resumed.state_dict() == {"stream": 1}  # the stream's version; the position is (epoch, batch)
    resumed.set_epoch(epochs_before, batches_before)
    per_epoch = len(full) // 3
    rest = stream(resumed, 3 - epochs_before)
    assert rest == full[epochs_before * per_epoch + batches_before:]


def test_the_source_runs_epoch_after_epoch_from_a_resumed_batch():
    from pipelines.augment import SizeSchedule
    from pipelines.dali_source import PADDING, TrainSamples

    source = TrainSamples([f"{i}.jpg" for i in range(10)], list(range(10)), seed=0, rank=0, world_size=1,
                          batch_size=4, sizes=SizeSchedule(32), first_epoch=2, first_batch=1)
    assert [source.batches_in_epoch(epoch) for epoch in (2, 3, 4)] == [2, 3, 3]
    located = [source.locate(p) for p in range(24)]
    assert located[:8] == [(2, p) for p in range(4, 12)]  # epoch 2 from its batch 1; 10 and 11 pad it
    assert located[8:20] == [(3, p) for p in range(12)] and located[20:] == [(4, p) for p in range(4)]
    source._sizes[:] = (40, 10)  # (width, height): no files to read the sizes from
    params = [source(type("Info", (), {"idx_in_epoch": p})())[1] for p in range(8, 20)]
    assert [int(row[6]) for row in params[10:]] == [PADDING, PADDING]
    # (left, top, width, height): a corner of at most 16x16, not a whole crop decoded for nothing
    assert [row[:4].tolist() for row in params[10:]] == [[0, 0, 16, 10]] * 2
    assert sorted(int(row[6]) for row in params[:10]) == list(range(10))


TRAINING_PATHS = [pytest.param({}, "cpu", id="cpu-torch-finishes"),
                  pytest.param({"dali": {"cpu_resize": "dali"}}, "cpu", id="cpu-dali-iterator"),  # the GPU path's iterator
                  pytest.param({"dali": {"device": "gpu"}}, "cuda", id="gpu-decoding", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("data, device", TRAINING_PATHS)
def test_the_training_pipeline_runs_on_across_epochs_and_resumes_exactly(tiny_imagefolder, monkeypatch, data, device):
    """No reset at an epoch's end (it would drain the prefetch queue), no rebuild to continue
    after a consumer stopped inside an epoch, and a new loader set to (epoch, batch) yields what
    the uninterrupted one did from there."""
    import itertools

    spec = CPU if device == "cpu" else BatchSpec(device=torch.device("cuda", torch.cuda.current_device()),
                                                 dtype=torch.float16)
    cfg = data_config(tiny_imagefolder, "dali", **data)
    full = stream(build_loaders(cfg, spec=spec, seed=0).train, 3)
    per_epoch = len(full) // 3
    loader = build_loaders(cfg, spec=spec, seed=0).train
    pipe = loader.host._pipe
    monkeypatch.setattr(type(pipe), "reset", lambda self: pytest.fail("the training pipeline was reset"))
    seen = stream(loader, 1)
    loader.set_epoch(1)
    seen += [(labels.tolist(), float(images.double().sum())) for images, labels in itertools.islice(pairs(loader), 2)]
    loader.set_epoch(1, 2)
    seen += stream(loader, 2)
    assert loader.host._pipe is pipe and seen == full and len(full) == 3 * per_epoch
    resumed = build_loaders(cfg, spec=spec, seed=0).train
    resumed.set_epoch(1, 2)
    assert stream(resumed, 2) == full[per_epoch + 2:]


@pytest.mark.parametrize("longer", ["source", "loader"])
def test_a_source_out_of_step_with_its_loader_stops_instead_of_cutting_other_crops(tiny_imagefolder, monkeypatch,
                                                                                    longer):
    """40 images in batches of 8: no padding at all, so counting samples would not notice a
    loader whose epoch is a batch longer than the source's; the samples' indices do."""
    import pipelines.dali_backend as backend
    import pipelines.dali_source as source

    module = source if longer == "source" else backend  # the source's epochs or the loader's, a batch longer
    monkeypatch.setattr(module, "samples_per_rank", lambda num_items, world_size, deal=1: num_items + 8)  # forked workers too
    loader = build_loaders(data_config(tiny_imagefolder, "dali", batch_size=8), spec=CPU, seed=0).train
    assert loader.num_samples == (48 if longer == "loader" else 40)
    with pytest.raises(RuntimeError, match="training stream is out of step: batch 5 of epoch 0" if longer == "loader"
                       else "training stream is out of step: batch 0 of epoch 1"):
        stream(loader, 2)


def training_batches_per_backend(root, *, seed: int, epoch: int, dali: dict | None = None, **data) -> dict[str, list]:
    """One epoch of (images, labels, indices, mix) training batches of 8 from torchvision and DALI
    (with `dali`'s settings)."""
    batches = {}
    for backend in ("torchvision", "dali"):
        loader = build_loaders(data_config(root, backend, batch_size=8, dali=dali if backend == "dali" else None,
                                           **data), spec=CPU, seed=seed).train
        loader.set_epoch(epoch)
        batches[backend] = [(b.images, b.labels, b.indices, b.mix) for b in loader]
    return batches


@pytest.mark.parametrize("cpu_resize, crops", [("torch", {}), ("dali", {}),
                                               ("torch", {"crop_scale": (0.5, 0.6), "crop_ratio": (0.5, 0.6)})])
def test_dali_and_torchvision_cut_the_same_training_crops(tiny_imagefolder, cpu_resize, crops):
    """Same order, same crop and flip per (seed, epoch, sample); pixels differ by resampling only,
    whether torch (the default) or DALI resizes DALI's decoded crops, with any crop ranges."""
    batches = training_batches_per_backend(tiny_imagefolder, seed=3, epoch=2, image_size=48, val_resize=55,
                                           dali={"cpu_resize": cpu_resize}, **crops)
    assert len(batches["dali"]) == len(batches["torchvision"]) == 5
    for (a, la, ia, _), (b, lb, ib, _) in zip(batches["torchvision"], batches["dali"]):
        assert torch.equal(ia, ib) and torch.equal(la, lb)
        difference = (a - b).abs()
        assert difference.mean() < VAL_MEAN_ABS_TOLERANCE, difference.mean()
        assert difference.flatten().quantile(0.999) < 0.2


def test_dali_and_torchvision_mix_the_same_pairs_alike(tiny_imagefolder):
    """mixup and CutMix run after the backends, on the same draws: the same partners and target
    weights exactly, pixels apart by resampling only."""
    batches = training_batches_per_backend(tiny_imagefolder, seed=3, epoch=1, image_size=48, val_resize=55,
                                           mix={"mixup_alpha": 0.8, "cutmix_alpha": 1.0})
    assert len(batches["dali"]) == len(batches["torchvision"]) == 5
    for (a, la, ia, ma), (b, lb, ib, mb) in zip(batches["torchvision"], batches["dali"]):
        assert torch.equal(ia, ib) and torch.equal(la, lb)
        assert torch.equal(ma.weight, mb.weight) and torch.equal(ma.partner_labels, mb.partner_labels)
        assert (ma.weight < 1).any()
        assert (a - b).abs().mean() < VAL_MEAN_ABS_TOLERANCE


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
def test_dali_and_torchvision_augment_the_same_samples_alike(tiny_imagefolder, policy):
    """RandAugment / TrivialAugmentWide run after the backends on draws of (seed, epoch, sample):
    both backends' batches get the same ops, so they stay apart by resampling only (a threshold
    op such as Solarize may flip a rare pixel that rounding put on the other side)."""
    common = dict(seed=3, epoch=1, image_size=48, val_resize=55)
    plain = training_batches_per_backend(tiny_imagefolder, **common)["torchvision"]
    batches = training_batches_per_backend(tiny_imagefolder, **{policy: {}}, **common)
    assert len(batches["dali"]) == len(batches["torchvision"]) == 5
    for (a, la, ia, _), (b, lb, ib, _), (unaugmented, _, _, _) in zip(batches["torchvision"], batches["dali"], plain):
        assert torch.equal(ia, ib) and torch.equal(la, lb)
        difference = (a - b).abs()
        assert difference.mean() < VAL_MEAN_ABS_TOLERANCE, difference.mean()
        assert difference.flatten().quantile(0.999) < 0.2
        assert (a - unaugmented).abs().mean() > 20 * VAL_MEAN_ABS_TOLERANCE  # the ops ran


def test_exif_oriented_training_images_are_cut_like_torchvision(tmp_path):
    """The crop window is computed on the oriented image; DALI must slice that image, not the
    stored one (a half-red half-noise picture shows any mismatch)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for folder in ("a", "b"):
            (tmp_path / split / folder).mkdir(parents=True)
            for i, orientation in enumerate((6, 8, 3, 5)):  # rotations, and a transpose
                pixels = (rng.random((60, 100, 3)) * 255).astype(np.uint8)
                pixels[:, :50] = (250, 10, 10)
                image = Image.fromarray(pixels)
                exif = image.getexif()
                exif[0x0112] = orientation
                image.save(tmp_path / split / folder / f"{i}.jpg", exif=exif, quality=95)
    batches = training_batches_per_backend(tmp_path, seed=0, epoch=0, image_size=32, val_resize=36)
    assert len(batches["torchvision"]) == len(batches["dali"]) == 1
    for (a, _, ia, _), (b, _, ib, _) in zip(batches["torchvision"], batches["dali"]):
        assert torch.equal(ia, ib) and len(ia) == 8
        assert (a - b).abs().mean() < VAL_MEAN_ABS_TOLERANCE and (a - b).abs().amax() < 0.25


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_a_stream_begun_by_another_fastkd_is_not_continued(tiny_imagefolder, backend):
    """Checkpoints of the older streams (DALI's reader state, or torchvision's torch.randperm
    order saved as {}) cannot be continued exactly: refused, not silently changed."""
    loader = build_loaders(data_config(tiny_imagefolder, backend), spec=CPU, seed=0).train
    loader.load_state_dict(loader.state_dict())
    for old in ({}, {"dali": b"checkpoint of the reader-based pipeline"}):
        with pytest.raises(CheckpointError, match="training stream .* differs from this one's"):
            loader.load_state_dict(old)


def test_partial_last_batch_counts_and_len(tiny_imagefolder):
    loaders = build_loaders(data_config(tiny_imagefolder, "dali", batch_size=16, val_batch_size=16, drop_last=False),
                            spec=CPU, seed=0)
    assert len(loaders.train) == 3 and [b.size for b in loaders.train] == [16, 16, 8]
    assert len(loaders.val) == 2 and [b.size for b in loaders.val] == [16, 4]
    dropped = build_loaders(data_config(tiny_imagefolder, "dali", batch_size=16, val_batch_size=16), spec=CPU, seed=0)
    assert len(dropped.train) == 2 and [b.size for b in dropped.train] == [16, 16]  # data.drop_last's default
    assert len(dropped.val) == 2 and [b.size for b in dropped.val] == [16, 4]


def test_unusual_files_decode_to_rgb_like_torchvision(tmp_path):
    root = tmp_path / "odd"
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
        (root / split / "b").mkdir(parents=True)
    colour = Image.new("RGB", (80, 60), (200, 30, 40))
    images = {
        "gray.jpg": Image.new("L", (80, 60), 100),
        "cmyk.jpg": Image.new("CMYK", (80, 60), (0, 200, 180, 40)),
        "progressive.jpg": colour,
        "png_named.jpg": colour,
        "UPPER.JPEG": colour,
        "plain.png": colour,
    }
    for name, image in images.items():
        for split in ("train", "val"):
            target = root / split / ("a" if "jpg" in name.lower() else "b") / name
            if name == "png_named.jpg" or name.endswith(".png"):
                image.save(target, format="PNG")
            else:
                image.save(target, format="JPEG", quality=95, progressive=name.startswith("progressive"))
    rotated = Image.new("RGB", (80, 40), (10, 200, 10))
    rotated.paste((200, 20, 200), (0, 0, 40, 40))  # two halves: a wrong orientation shows
    exif = rotated.getexif()
    exif[0x0112] = 6
    for split in ("train", "val"):
        rotated.save(root / split / "b" / "exif.jpg", exif=exif, quality=95)
    batches = {}
    for backend in ("torchvision", "dali"):
        cfg = data_config(root, backend, image_size=32, val_resize=32, val_batch_size=16)
        batches[backend] = next(pairs(build_loaders(cfg, spec=CPU, seed=0).val))
        check_batch(*batches[backend], spec=CPU, image_size=32, num_classes=2, max_batch_size=16)
    assert batches["dali"][0].shape[0] == 7
    difference = (batches["torchvision"][0] - batches["dali"][0]).abs().amax(dim=(1, 2, 3))
    assert (difference < 0.2).all(), difference  # same colours, same orientation


def test_gpu_decoding_for_a_cpu_run_is_a_clear_error(tiny_imagefolder):
    with pytest.raises(ConfigError, match="data.dali.device: gpu requested but the run trains on the CPU"):
        build_loaders(data_config(tiny_imagefolder, "dali", dali={"device": "gpu"}), spec=CPU, seed=0)


@pytest.mark.parametrize("requested, device, expected", [
    ("auto", "cpu", "cpu"), ("auto", "cuda", "gpu"), ("cpu", "cuda", "cpu"), ("gpu", "cuda", "gpu")])
def test_dali_device_follows_the_training_device_not_the_host(requested, device, expected):
    assert resolve_dali_device(requested, torch.device(device)) == expected


@pytest.mark.parametrize("dali_device", ["gpu", "cpu"])
@pytest.mark.parametrize("train", [True, False])
def test_gpu_graphs_are_valid_without_a_gpu(tiny_imagefolder, dali_device, train):
    """The GPU (mixed decoder) and hybrid (CPU decoder, GPU augmentation) graphs, constructed and
    serialized on the CPU: argument and placement errors surface here, not on a GPU."""
    cfg = data_config(tiny_imagefolder, "dali", dali={"device": dali_device})
    dataset = load_data(cfg)
    place = placement(dali_device, GPU_SPEC, hw_decoder_load=0.65, files=dataset.train.files)
    assert place.on_gpu and (place.decoder == "mixed") == (dali_device == "gpu")
    split = dataset.train if train else dataset.val
    loader = DaliBatches(split, train=train, batch_size=4, place=place, seed=0, shard=Shard(), spec=GPU_SPEC,
                         num_threads=1, build=False, **dali_loader_values(cfg))
    pipe = loader.create_pipeline(device_id=None)
    graph = pipe.serialize()
    if dali_device == "gpu":
        assert b"preallocate_width_hint" in graph  # sized from the data's headers
    devices = operator_devices(pipe)
    decoder = "decoders__ImageSlice" if train else "decoders__Image"
    assert devices[decoder] == ("mixed" if dali_device == "gpu" else "cpu")
    assert devices["Resize"] == devices["CropMirrorNormalize"] == "gpu"  # augmentation on the GPU either way


def operator_devices(pipe) -> dict[str, str]:
    """Operator name -> device of a constructed (not built) pipeline."""
    devices = {}
    for op in pipe._ops:
        text = str(op.spec)
        name = text.split("OpSpec for ", 1)[1].split(":", 1)[0].strip()
        devices[name] = text.split("device: ", 1)[1].split()[0]
    return devices


def test_training_on_the_cpu_finishes_crops_with_torch_unless_told_otherwise():
    cpu_spec = BatchSpec(device=torch.device("cpu"), dtype=torch.float32)
    assert placement("cpu", cpu_spec, hw_decoder_load=0.65, files=[]).finish_with_torch
    assert not placement("cpu", cpu_spec, hw_decoder_load=0.65, files=[], cpu_resize="dali").finish_with_torch
    assert not placement("cpu", GPU_SPEC, hw_decoder_load=0.65, files=[]).finish_with_torch  # hybrid: GPU resize


@pytest.mark.parametrize("cpu_resize", ["torch", "dali"])
def test_batches_kept_by_the_caller_are_never_overwritten(tiny_imagefolder, cpu_resize):
    """Batch memory is recycled (`pipelines.resample.BatchBuffers`) only once the caller has let
    go of it: batches kept in a list equal the same stream read batch by batch."""
    cfg = data_config(tiny_imagefolder, "dali", batch_size=4, dali={"cpu_resize": cpu_resize})
    on_the_fly = stream(build_loaders(cfg, spec=CPU, seed=0).train, 2)
    loader = build_loaders(cfg, spec=CPU, seed=0).train
    kept = [batch for epoch in range(2) for batch in (loader.set_epoch(epoch), list(pairs(loader)))[1]]
    assert [(labels.tolist(), float(images.double().sum())) for images, labels in kept] == on_the_fly
    assert len({images.data_ptr() for images, _ in kept}) == len(kept)


def test_a_file_gone_after_the_first_epoch_is_named(tiny_imagefolder, tmp_path):
    """Sizes are read once, files every epoch (by DALI): a file removed mid-run is a data error
    naming it, not a crash in a worker."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_imagefolder, root)
    loader = build_loaders(data_config(root, "dali", batch_size=8, verify_images=False), spec=CPU, seed=0).train
    list(loader)
    gone = sorted((root / "train").rglob("*.*"))[0]
    gone.unlink()
    loader.set_epoch(1)
    with pytest.raises(DataError, match=gone.name) as raised:
        list(loader)
    assert "cannot read " not in str(raised.value)  # DALI's read failed, not our header parse


def test_decoder_hints_come_from_the_data(tiny_imagefolder):
    files = load_data(data_config(tiny_imagefolder, "dali")).train.files
    width, height = size_hints(files)
    assert width == height == 64  # the tiny images' largest side, either orientation


@pytest.mark.parametrize("train", [True, False])
def test_a_dali_error_is_a_data_error_only_when_a_file_in_flight_is_broken(tiny_imagefolder, tmp_path, monkeypatch,
                                                                           train):
    """Whatever DALI's message says: an error while a file of the batches in flight (the one
    being read and the prefetched ones after it, into the next epoch) does not decode names that
    file; with every such file sound, a broken file elsewhere included, it is DALI's own error."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_imagefolder, root)
    decode = RuntimeError("Error in CPU operator `nvidia.dali.fn.decoders.image_random_crop`: nvImageCodec failure")
    oom = RuntimeError("Error in MIXED operator `nvidia.dali.fn.decoders.image_random_crop`: CUDA error: out of memory")
    # Batches of 2 and a queue of 2: 8 files in flight of the 40 training / 20 validation files.
    loaders = build_loaders(data_config(root, "dali", verify_images=False, batch_size=2, dali={"prefetch_queue": 2}),
                            spec=CPU, seed=0)
    loader = loaders.train if train else loaders.val
    order = (lambda e: epoch_order(40, seed=0, epoch=e, shuffle=True)) if train else (lambda e: list(range(20)))
    start = 16 if train else 0  # training resumes at batch 8: positions 16-23 are in flight
    in_flight = order(0)[start:start + 8]
    outside = next(i for i in order(0)[:start] + order(0)[start + 8:] if i not in in_flight and i not in order(1)[:8])

    def read_with(error):
        if train:
            loader.set_epoch(0, start // 2)  # a failed epoch leaves the stream's place unknown: set_epoch
        monkeypatch.setattr(loader.host, "_iterator", failing(error))
        with pytest.raises(Exception) as raised:
            next(iter(loader))
        return raised.value

    def failing(error):
        def iterate():
            raise error
            yield
        return iterate()

    def break_file(index: int) -> Path:
        path = Path(loader.host._files[index])
        path.write_bytes(b"\xff\xd8\xff broken")
        return path

    break_file(outside)
    for error in (decode, oom):  # every file in flight sound: DALI's error as it was raised
        assert read_with(error) is error
    broken = break_file(in_flight[5])
    for error in (decode, oom):
        raised = read_with(error)
        assert isinstance(raised, DataError) and f"cannot decode {broken}" in str(raised)
        assert "fastkd data verify" in str(raised)
    if train:  # the end of an epoch: the next epoch's first files are in flight too
        shutil.copy(next(p for p in sorted((tiny_imagefolder / "train").rglob("*.*"))), broken)
        nxt = break_file(order(1)[1])
        loader.set_epoch(0, 19)  # the last batch
        monkeypatch.setattr(loader.host, "_iterator", failing(decode))
        with pytest.raises(DataError, match=f"cannot decode {nxt}"):
            next(iter(loader))


def build_after_cyclic_garbage(root: str) -> None:
    """Leave a loader as garbage in a cycle (held by an exception's traceback, as after a failed
    epoch; its pipeline's threads still waiting), then start the next loader's forked workers."""
    cfg = data_config(Path(root), "dali")

    def fail_with_a_loader_in_a_cycle() -> None:
        loaders = build_loaders(cfg, spec=CPU, seed=0)
        next(iter(loaders.train))
        try:
            raise RuntimeError("an epoch failed")
        except RuntimeError as exc:
            exc.again = exc  # exception -> traceback -> this frame -> exception, and `loaders` with it

    for seed in (1, 2):
        fail_with_a_loader_in_a_cycle()
        images, labels = next(pairs(build_loaders(cfg, spec=CPU, seed=seed).train))
        assert images.shape[0] == labels.shape[0] > 0


def test_a_loader_left_as_cyclic_garbage_does_not_break_the_next_one_s_forked_workers(tiny_imagefolder):
    """A forked worker must not destroy the inherited garbage pipeline (it would wait forever on a
    lock, or break the new workers' queue): run in a process of its own, with a limit."""
    script = ("from tests.test_dali import build_after_cyclic_garbage; "
              f"build_after_cyclic_garbage({str(tiny_imagefolder)!r})")
    try:
        done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=hooked_env(), capture_output=True,
                              text=True, timeout=180)  # a hang is forever; a loaded CI machine is slow
    except subprocess.TimeoutExpired:
        pytest.fail("building a loader after one left as cyclic garbage hung")
    assert done.returncode == 0, done.stderr[-2000:]


def test_batches_are_channels_last_views_of_the_pipeline_output(tiny_imagefolder):
    loader = build_loaders(data_config(tiny_imagefolder, "dali"), spec=CPU, seed=0).train
    host = next(iter(loader.host))
    hwc, images = host.images, loader.device_stages(host).images
    assert hwc.shape[-1] == 3 and images.shape[1] == 3
    assert images.data_ptr() == hwc.data_ptr() and images.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.gpu
@pytest.mark.parametrize("dali_device", ["gpu", "cpu"])
def test_gpu_pipelines_honour_the_contract_in_fp16(tiny_imagefolder, dali_device):
    """GPU decoding, and hybrid (CPU decoding, GPU augmentation): batches arrive on the GPU."""
    spec = BatchSpec(device=torch.device("cuda", torch.cuda.current_device()), dtype=torch.float16)
    loaders = build_loaders(data_config(tiny_imagefolder, "dali", dali={"device": dali_device}), spec=spec, seed=0)
    for loader in (loaders.train, loaders.val):
        total = 0
        for host in loader.host:
            hwc = host.images
            assert hwc.is_cuda and host.labels.is_cuda  # no pageable host copy per batch
            batch = loader.device_stages(host)
            images, labels = batch.images, batch.labels
            assert images.data_ptr() == hwc.data_ptr()  # zero-copy channels-last view
            check_batch(images, labels, spec=spec, image_size=32, num_classes=10, max_batch_size=7)
            total += labels.shape[0]
        assert total == loader.num_samples


@pytest.mark.gpu
def test_gpu_and_cpu_decoding_agree_on_validation(tiny_imagefolder):
    spec = BatchSpec(device=torch.device("cuda", torch.cuda.current_device()), dtype=torch.float32)
    gpu = next(pairs(build_loaders(data_config(tiny_imagefolder, "dali", dali={"device": "gpu"}, val_batch_size=20),
                                   spec=spec, seed=0).val))
    cpu = next(pairs(build_loaders(data_config(tiny_imagefolder, "dali", val_batch_size=20), spec=CPU, seed=0).val))
    assert torch.equal(gpu[1].cpu(), cpu[1])
    # nvJPEG and libjpeg-turbo upsample chroma differently: allow a few grey levels on average.
    assert (gpu[0].cpu() - cpu[0]).abs().mean() < 0.05
