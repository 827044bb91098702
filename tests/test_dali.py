"""The DALI backend on its CPU path (GPU-only checks are marked `gpu`)."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from fastkd.errors import ConfigError
from pipelines import build_loaders
from pipelines.base import BatchSpec, check_batch
from tests.test_pipelines import CPU, data_config

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")

# Measured on the demo images (64/73, 224/256 px): mean |difference| 0.0015-0.003 in normalized
# units (about 0.1-0.2 grey levels). Decoders and resampling filters differ in rounding only.
VAL_MEAN_ABS_TOLERANCE = 0.01
VAL_PIXEL_P999_TOLERANCE = 0.1


def stream(loader, epochs: int) -> list[tuple[list[int], float]]:
    out = []
    for _ in range(epochs):
        for images, labels in loader:
            out.append((labels.tolist(), float(images.double().sum())))
    return out


@pytest.mark.parametrize("size, resize", [(32, 36), (60, 60), (56, 64)])
def test_dali_cpu_and_torchvision_validation_batches_agree(tiny_imagefolder, size, resize):
    batches = {}
    for backend in ("torchvision", "dali"):
        cfg = data_config(tiny_imagefolder, backend, image_size=size, val_resize=resize, val_batch_size=20)
        images, labels = next(iter(build_loaders(cfg, spec=CPU, seed=0).val))
        batches[backend] = (images, labels)
    assert torch.equal(batches["torchvision"][1], batches["dali"][1])
    difference = (batches["torchvision"][0] - batches["dali"][0]).abs()
    assert difference.mean() < VAL_MEAN_ABS_TOLERANCE
    assert difference.flatten().quantile(0.999) < VAL_PIXEL_P999_TOLERANCE


def test_training_stream_is_seeded_and_reshuffled_every_epoch(tiny_imagefolder):
    cfg = data_config(tiny_imagefolder, "dali")
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
def test_pipeline_checkpoint_resumes_the_exact_stream(tiny_imagefolder, epochs_before, batches_before):
    cfg = data_config(tiny_imagefolder, "dali")
    full = stream(build_loaders(cfg, spec=CPU, seed=0).train, 3)
    loader = build_loaders(cfg, spec=CPU, seed=0).train
    seen = stream(loader, epochs_before)
    iterator = iter(loader)
    for _ in range(batches_before):
        images, labels = next(iterator)
        seen.append((labels.tolist(), float(images.double().sum())))
    buffer = io.BytesIO()
    torch.save(loader.state_dict(), buffer)  # as inside a fastkd checkpoint
    buffer.seek(0)
    resumed = build_loaders(cfg, spec=CPU, seed=0).train
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    rest = stream(resumed, 3 - epochs_before)
    assert seen + rest == full


def test_partial_last_batch_counts_and_len(tiny_imagefolder):
    loaders = build_loaders(data_config(tiny_imagefolder, "dali", batch_size=16, val_batch_size=16), spec=CPU, seed=0)
    assert len(loaders.train) == 3 and [len(y) for _, y in loaders.train] == [16, 16, 8]
    assert len(loaders.val) == 2 and [len(y) for _, y in loaders.val] == [16, 4]


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
    exif = rotated.getexif()
    exif[0x0112] = 6
    for split in ("train", "val"):
        rotated.save(root / split / "b" / "exif.jpg", exif=exif, quality=95)
    batches = {}
    for backend in ("torchvision", "dali"):
        cfg = data_config(root, backend, image_size=32, val_resize=32, val_batch_size=16)
        batches[backend] = next(iter(build_loaders(cfg, spec=CPU, seed=0).val))
        check_batch(*batches[backend], spec=CPU, image_size=32, num_classes=2, max_batch_size=16)
    assert batches["dali"][0].shape[0] == 7
    difference = (batches["torchvision"][0] - batches["dali"][0]).abs().amax(dim=(1, 2, 3))
    assert (difference < 0.2).all(), difference  # same colours, same orientation


def test_gpu_decoding_without_a_gpu_is_a_clear_error(tiny_imagefolder):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="data.dali_device: gpu requested but no CUDA GPU is available"):
        build_loaders(data_config(tiny_imagefolder, "dali", dali_device="gpu"), spec=CPU, seed=0)


@pytest.mark.gpu
def test_gpu_pipeline_honours_the_contract_in_fp16(tiny_imagefolder):
    spec = BatchSpec(device=torch.device("cuda"), dtype=torch.float16)
    loaders = build_loaders(data_config(tiny_imagefolder, "dali", dali_device="gpu"), spec=spec, seed=0)
    for loader in (loaders.train, loaders.val):
        total = 0
        for images, labels in loader:
            check_batch(images, labels, spec=spec, image_size=32, num_classes=10, max_batch_size=7)
            assert images.data_ptr() == images.permute(0, 2, 3, 1).data_ptr()  # zero-copy view
            total += labels.shape[0]
        assert total == loader.num_samples


@pytest.mark.gpu
def test_gpu_and_cpu_decoding_agree_on_validation(tiny_imagefolder):
    spec = BatchSpec(device=torch.device("cuda"), dtype=torch.float32)
    gpu = next(iter(build_loaders(data_config(tiny_imagefolder, "dali", dali_device="gpu", val_batch_size=20),
                                  spec=spec, seed=0).val))
    cpu = next(iter(build_loaders(data_config(tiny_imagefolder, "dali", val_batch_size=20), spec=CPU, seed=0).val))
    assert torch.equal(gpu[1].cpu(), cpu[1])
    # nvJPEG and libjpeg-turbo upsample chroma differently: allow a few grey levels on average.
    assert (gpu[0].cpu() - cpu[0]).abs().mean() < 0.05
