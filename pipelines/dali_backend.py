"""NVIDIA DALI pipelines: JPEG decoding and augmentation on the GPU (or DALI's CPU backend).

Training:   Python source (order, crop and flip as explicit numbers: `pipelines.augment`) ->
            decode only the crop's region (`decoders.image_slice`) -> resize to the epoch's
            size (`data` size schedule; it comes with each sample, so a new size needs no new
            pipeline) -> flip + normalize (fp16 on a GPU with AMP, else fp32), HWC; with a
            teacher of its own input size, the same crop resized again for it. Training on the CPU,
            the pipeline ends at the decoded crops and torch's uint8 kernels finish them
            (`pipelines.resample`, `data.dali.cpu_resize: torch`): DALI's CPU resize costs
            more than its decoding.
Validation: file reader -> decode -> resize shorter side to val_resize -> centre crop +
            normalize, HWC

Where each part runs follows `data.dali.device` and the training device:

| dali.device | training device | decode (+ crop)          | resize, flip, normalize |
| ----------- | --------------- | ------------------------ | ----------------------- |
| gpu         | cuda            | GPU (`mixed`: nvJPEG, and the hardware JPEG decoder of A100/H100-class GPUs) | GPU |
| cpu         | cuda            | CPU (libjpeg-turbo)      | GPU (hybrid, as NVIDIA's examples: the batch leaves the pipeline on the GPU) |
| cpu         | cpu             | CPU                      | CPU (torch after the pipeline, or DALI: `data.dali.cpu_resize`) |

HWC batches become NCHW channels-last views with `permute(0, 3, 1, 2)`: no copy.

The training stream is the torchvision backend's: the same order (a permutation of (seed,
epoch), sharded by global rank) and the same crop and flip per (seed, epoch, sample), read by
DALI's parallel external source (`pipelines.dali_source.TrainSamples`) in Python worker
processes. It is a pure function of (seed, epoch, batch): resuming rebuilds the pipeline at the
checkpoint's epoch and batch, with no pipeline state to save, and the loader yields each
sample's index (what a teacher cache is keyed by).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from fastkd.errors import ConfigError, DataError
from pipelines.base import IMAGENET_MEAN, IMAGENET_STD, Batch, BatchSpec, Loader, Loaders, Shard
from pipelines.datasets import Dataset, Split
from pipelines.augment import (CropRange, SizeSchedule, batches_per_epoch, check_stream_state, epoch_order,
                               samples_per_rank, stream_state)
from pipelines.dali_source import PADDING, PARAMS, UNREADABLE, TrainSamples
from pipelines.resample import CropFinisher
from pipelines.torchvision_backend import BROKEN_HINT
from pipelines.verify import image_problem
from pipelines.worker_lifetime import workers_die_with_this_process

try:
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
except ImportError as exc:  # pragma: no cover - depends on the install
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

READER = "Reader"
_PARAM = {name: i for i, name in enumerate(PARAMS)}
# Images whose header is read to size the decoders' preallocation (cheap: headers only).
SIZE_HINT_SAMPLES = 64


def resolve_dali_device(requested: str, device: torch.device) -> str:
    """Where DALI decodes ("gpu" or "cpu"), from `data.dali.device` and the training device."""
    if requested == "gpu" and device.type != "cuda":
        why = "runtime.device is cpu" if torch.cuda.is_available() else "no CUDA GPU is available"
        raise ConfigError(f"data.dali.device: gpu requested but the run trains on the CPU ({why}); use auto or cpu")
    if requested == "auto":
        return "gpu" if device.type == "cuda" else "cpu"
    return requested


def size_hints(files: list[str]) -> tuple[int, int]:
    """(width, height) to preallocate the GPU decoders for: the largest of a sample of the data.

    Larger images still decode (the decoder grows its buffers once); this only spares the
    first batches that reallocation.
    """
    from PIL import Image

    from pipelines.verify import unlimited_pixels

    width = height = 0
    for path in files[:SIZE_HINT_SAMPLES]:
        try:
            with unlimited_pixels(), Image.open(path) as image:
                w, h = image.size
        except (OSError, ValueError):
            continue  # broken files are the verifier's business
        width, height = max(width, w, h), max(height, w, h)  # either orientation (EXIF)
    return width, height


def _require_dali() -> None:
    if _IMPORT_ERROR is not None:
        raise ConfigError("data.backend: dali needs NVIDIA DALI (pip install 'fastkd[dali]', or "
                          f"nvidia-dali-cuda130 for CUDA 13); import failed: {_IMPORT_ERROR}")


def _normalize(images, *, dtype, mirror=None):
    kwargs = {"mirror": mirror} if mirror is not None else {}
    return fn.crop_mirror_normalize(
        images, dtype=dtype, output_layout="HWC",
        mean=[255 * m for m in IMAGENET_MEAN], std=[255 * s for s in IMAGENET_STD], **kwargs)


@dataclass(frozen=True)
class Placement:
    """Where the operators of a graph run (see the table at the top of this module)."""

    decoder: str
    """'mixed' (GPU decoding) or 'cpu'."""
    to_gpu_after_decode: bool
    """Hybrid: decode on the CPU, augment on the GPU."""
    decoder_hints: dict[str, Any]
    finish_with_torch: bool = False
    """Training on the CPU: the pipeline yields the decoded crops, torch resizes, flips and
    normalizes them (`pipelines.resample`)."""

    @property
    def on_gpu(self) -> bool:
        return self.decoder == "mixed" or self.to_gpu_after_decode


def _train_graph(source: TrainSamples, *, place: Placement, dtype, teacher_view: bool = False):
    """Outputs: images, labels, indices (and the teacher's view of the same crops); on the CPU
    with torch finishing, the decoded crops and the params rows."""
    paths, params = fn.external_source(source=source, batch=False, parallel=True, num_outputs=2,
                                       prefetch_queue_depth=2)
    # Plain reads: mapping each small file measured slower than reading it.
    jpegs = fn.io.file.read(paths, dont_use_mmap=True)
    left, width = _PARAM["left"], _PARAM["width"]  # (left, top) and (width, height): adjacent columns
    anchor = fn.cast(params[left:left + 2], dtype=types.INT32)
    shape = fn.cast(params[width:width + 2], dtype=types.INT32)
    # adjust_orientation: the window is in pixels of the EXIF-oriented image (DALI 2's default,
    # stated so that a DALI without it fails when the graph is built).
    images = fn.decoders.image_slice(
        jpegs, anchor, shape, device=place.decoder, output_type=types.RGB, axis_names="WH",
        normalized_anchor=False, normalized_shape=False, adjust_orientation=True, **place.decoder_hints)
    if place.finish_with_torch:
        return images, params
    if place.to_gpu_after_decode:
        images = images.gpu()
    flip = fn.cast(params[_PARAM["flip"]], dtype=types.INT32)

    def view(side):  # the epoch's size comes with each sample: no rebuild when it changes
        side = fn.cast(side, dtype=types.FLOAT)
        return _normalize(fn.resize(images, resize_x=side, resize_y=side, antialias=True), dtype=dtype, mirror=flip)

    label = fn.cast(params[_PARAM["label"]], dtype=types.INT32)
    outputs = [view(params[_PARAM["size"]]), label.gpu() if place.on_gpu else label, params[_PARAM["index"]]]
    if teacher_view:
        outputs.append(view(params[_PARAM["teacher_size"]]))
    return tuple(outputs)  # the index stays on the host


def _torchvision_centre_crop(images, *, image_size: int, val_resize: int):
    """Resize + centre crop with torchvision's exact geometry (so val batches match its baseline).

    torchvision truncates the longer side (`int(val_resize * long / short)`) and rounds the crop
    offset half-to-even (`int(round((extent - size) / 2))`); DALI's `resize_shorter` and
    `crop_pos` round differently, which shifts images by a pixel. Sizes and offsets are computed
    per sample from the decoded shape (EXIF orientation included).
    """
    shape = images.shape(dtype=types.FLOAT)
    h, w = shape[0], shape[1]
    h_short = h <= w
    new_h = h_short * val_resize + (1 - h_short) * dmath.floor(val_resize * h / w)
    new_w = (1 - h_short) * val_resize + h_short * dmath.floor(val_resize * w / h)

    def centre(extent):
        half = (extent - image_size) / 2
        k = dmath.floor(half)
        return k + (half > k) * (k - 2 * dmath.floor(k / 2))  # round half to even

    images = fn.resize(images, resize_x=new_w, resize_y=new_h, antialias=True)
    start = fn.cast(fn.stack(centre(new_h), centre(new_w)), dtype=types.INT32)
    return fn.slice(images, start=start, shape=[image_size, image_size], axes=[0, 1])


def _val_graph(files: list[str], labels: list[int], *, place: Placement, image_size: int, val_resize: int,
               shard: Shard, dtype):
    jpegs, label = fn.readers.file(
        files=files, labels=labels, name=READER, random_shuffle=False, shard_id=shard.rank,
        num_shards=shard.world_size, stick_to_shard=True, pad_last_batch=True)
    images = fn.decoders.image(jpegs, device=place.decoder, output_type=types.RGB, **place.decoder_hints)
    if place.to_gpu_after_decode:
        images = images.gpu()
    images = _torchvision_centre_crop(images, image_size=image_size, val_resize=val_resize)
    images = _normalize(images, dtype=dtype)
    return images, (label.gpu() if place.on_gpu else label)


def build_pipeline(pipe) -> None:
    """`pipe.build()`, which starts its Python workers, safely when they are forked.

    A forked worker inherits the parent's heap, with any DALI pipeline left as cyclic garbage (a
    loader held by an exception's traceback, say) whose threads were waiting on its locks. Were
    the worker's garbage collector to destroy that pipeline, it would wait forever on a lock of a
    thread the fork did not copy, or tear down shared resources. So every object that exists at
    the fork is frozen out of the worker's collections (`gc.freeze`, as Python's documentation
    advises before a fork; O(1), whatever the start method). The parent collects such garbage later, as it would have.

    The workers end with this process however it dies (`pipelines.worker_lifetime`): a trainer
    killed with SIGKILL leaves none behind."""
    gc.freeze()
    try:
        with workers_die_with_this_process():
            pipe.build()
    finally:
        gc.unfreeze()


def python_workers(num_threads: int, *, gpu: bool) -> dict[str, Any]:
    """Pipeline arguments for the training source's Python workers: half as many as DALI threads;
    forked (quick) in CPU-only runs, spawned whenever a GPU is involved, since forking after
    CUDA (torch's or DALI's) is unsafe."""
    start = "spawn" if gpu or torch.cuda.is_initialized() else "fork"
    return {"py_num_workers": max(1, num_threads // 2), "py_start_method": start}


class _StreamError(RuntimeError):
    """The loader's own bookkeeping failed (not DALI, not the data)."""


class DaliBatches:
    """The host stage of the DALI backend (`pipelines.base.HostStage`): a DALI pipeline and its
    iterator. Its batches are HWC, on the GPU when DALI augments there, with labels, the training
    samples' indices (on the host) and the teacher's view of the same crops (None without one);
    `DaliToDevice` is the stage after it."""

    def __init__(self, split: Split, *, train: bool, batch_size: int, place: Placement, seed: int, shard: Shard,
                 spec: BatchSpec, num_threads: int, sizes: SizeSchedule, val_size: int, val_resize: int,
                 prefetch_queue: int, crop_range: CropRange = CropRange(), teacher_size: int | None = None,
                 deal: int = 1, drop_last: bool = False, build: bool = True):
        self.batch_size = batch_size
        self.teacher_size = teacher_size if train else None
        """The side of the teacher's view of each training crop (None: no second view)."""
        self.spec = spec
        self.train = train
        self._place = place
        self._shard = shard
        self._num_threads = num_threads
        self._sizes, self._crop_range = sizes, crop_range
        self._val_size, self._val_resize = val_size, val_resize
        self.prefetched_batches = prefetch_queue
        """DALI's prefetch queue depth: batches it runs ahead of the consumer."""
        self._seed = seed
        self._deal = deal if train else 1
        """Positions dealt out to ranks in runs of this many (`pipelines.augment.epoch_order`)."""
        self._drop_last = drop_last and train
        """Training epochs end at their last full batch (`data.drop_last`)."""
        self._files, self._labels = list(split.files), list(split.labels)
        start, end = self._val_shard()
        self.num_samples = samples_per_rank(len(self._files), shard.world_size, self._deal) if train else end - start
        self._position: tuple[int, int] | None = None
        """(epoch, batch) the training pipeline yields next; None when unknown (rebuild)."""
        self._reading: tuple[int | None, int] | None = None
        """(epoch, batch) being read now (epoch None in validation), to name a file at fault."""
        self._finisher = CropFinisher(spec.dtype)
        self._pipe = None
        if build:  # False only to inspect the graph (`create_pipeline`) where it cannot run
            self._iterator = self._build(0, 0)

    def create_pipeline(self, first_epoch: int = 0, first_batch: int = 0, *, device_id: int | None | str = "auto"):
        """The DALI pipeline of this loader, not yet built (`device_id` "auto": the training GPU's
        index when any part runs on the GPU; tests pass None to serialize a GPU graph on the CPU)."""
        shard, place = self._shard, self._place
        dtype = types.FLOAT16 if self.spec.dtype == torch.float16 else types.FLOAT
        if device_id == "auto":
            # The training device's own index, not LOCAL_RANK: with a per-process
            # CUDA_VISIBLE_DEVICES every process's GPU is device 0.
            device_id = None
            if place.on_gpu:
                device_id = self.spec.device.index if self.spec.device.index is not None else torch.cuda.current_device()
        workers = python_workers(self._num_threads, gpu=place.on_gpu) if self.train else {}

        # exec_dynamic: the validation graph sizes its resize from the decoded images' shape,
        # which on GPU-decoded images is a GPU -> CPU transition only the dynamic executor allows.
        @pipeline_def(batch_size=self.batch_size, num_threads=self._num_threads, device_id=device_id,
                      seed=self._seed * 1009 + shard.rank + (0 if self.train else 7), exec_dynamic=True,
                      prefetch_queue_depth=self.prefetched_batches, **workers)
        def pipeline():
            if self.train:
                source = TrainSamples(self._files, self._labels, seed=self._seed, rank=shard.rank,
                                      world_size=shard.world_size, batch_size=self.batch_size,
                                      sizes=self._sizes, teacher_size=self.teacher_size,
                                      first_epoch=first_epoch, first_batch=first_batch, crop_range=self._crop_range,
                                      deal=self._deal, drop_last=self._drop_last)
                return _train_graph(source, place=place, dtype=dtype, teacher_view=self.teacher_size is not None)
            return _val_graph(self._files, self._labels, place=place, image_size=self._val_size,
                              val_resize=self._val_resize, shard=shard, dtype=dtype)

        return pipeline()

    def _build(self, first_epoch: int, first_batch: int):
        self._iterator = self._pipe = None  # the previous pipeline and its Python workers go first
        pipe = self.create_pipeline(first_epoch, first_batch)
        build_pipeline(pipe)
        self._pipe = pipe
        if self.train:
            self._position = (first_epoch, first_batch)
            if self._place.finish_with_torch:
                return _finished_with_torch(pipe, self._finisher)
            outputs = ["images", "labels", "indices"] + (["teacher_images"] if self.teacher_size else [])
            # The source never ends (`TrainSamples`): the iterator is never reset, `_train_batches`
            # takes each epoch's batches from it.
            return DALIGenericIterator([pipe], outputs, auto_reset=False, prepare_first_batch=False)
        return DALIGenericIterator([pipe], ["images", "labels"], reader_name=READER,
                                   last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True,
                                   prepare_first_batch=False)

    def __len__(self) -> int:
        return batches_per_epoch(self.num_samples, self.batch_size, self._drop_last)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Training: the next iteration yields `epoch` from `start_batch` on (a rebuild unless the
        pipeline is already there, as after a whole epoch). Validation has one fixed order."""
        if self.train and self._position != (epoch, start_batch):
            self._iterator = self._build(epoch, start_batch)

    def state_dict(self) -> dict[str, Any]:
        return stream_state()  # the stream is a pure function of (seed, epoch, batch)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_stream_state(state)

    def __iter__(self) -> Iterator[Batch]:
        self._reading = None if self.train else (None, 0)
        try:
            if self.train:
                yield from self._train_batches()
                return
            for number, (batch,) in enumerate(self._iterator):
                self._reading = (None, number + 1)
                if batch["labels"].shape[0]:  # not an uneven validation shard's empty trailing batch
                    yield Batch(batch["images"], batch["labels"], None)
        except Exception as exc:  # DALI raises RuntimeError, or Exception for its Python workers' errors
            if self.train:
                self._position = None  # the pipeline's place in the stream is lost: set_epoch rebuilds it
            fault = None if isinstance(exc, _StreamError) else self._data_fault(exc)
            if fault is None:
                raise  # CUDA errors, out of memory, nvJPEG set-up, or no file to blame: DALI's own error
            raise DataError(f"DALI could not read or decode an image: {fault}{BROKEN_HINT}") from None

    def _data_fault(self, exc: Exception) -> str | None:
        """Which file a DALI error comes from, on evidence rather than DALI's wording: our own
        source's message naming a file it could not read, or a file of the batches DALI may have
        been working on (the one being read and those prefetched after it) that PIL cannot decode
        either. None when neither holds: the error is then not the data's (or not provably)."""
        own = [line.split(UNREADABLE, 1)[1] for line in str(exc).splitlines() if UNREADABLE in line]
        if own:
            return f"cannot read {own[0].strip()[:300]}"
        for path in self._files_in_flight():
            problem = image_problem(path)
            if problem is not None:
                return f"cannot decode {path}: {problem}"
        return None

    def _val_shard(self) -> tuple[int, int]:
        """Validation: DALI's reader gives shard r the contiguous files [N*r // W, N*(r+1) // W)."""
        total, shard = len(self._files), self._shard
        return total * shard.rank // shard.world_size, total * (shard.rank + 1) // shard.world_size

    def _files_in_flight(self) -> list[str]:
        """The files of the batch being read and of the `data.dali.prefetch_queue` (+1) batches after
        it, into the next epoch (training's stream runs on) or back to the start (validation)."""
        if self._reading is None:
            return []
        epoch, first = self._reading
        count = (self.prefetched_batches + 2) * self.batch_size
        if epoch is None:
            start, end = self._val_shard()
            files = self._files[start:end]
            return (files[first * self.batch_size:] + files)[:count]
        order = lambda e: epoch_order(len(self._files), seed=self._seed, epoch=e, shuffle=True,  # noqa: E731
                                      rank=self._shard.rank, world_size=self._shard.world_size, deal=self._deal)
        ahead = order(epoch)[first * self.batch_size:]
        if len(ahead) < count:
            ahead += order(epoch + 1)
        return [self._files[i] for i in ahead[:count]]

    def _train_batches(self) -> Iterator[Batch]:
        """The rest of the current epoch, from the pipeline's never-ending stream (`TrainSamples`)."""
        if self._position is None:
            raise _StreamError("DaliBatches: an epoch failed midway; call set_epoch(epoch, batch) before reading again")
        epoch, first = self._position
        shard = self._shard
        # What each batch must hold: the source computes the same order in its workers.
        order = torch.tensor(epoch_order(len(self._files), seed=self._seed, epoch=epoch, shuffle=True, rank=shard.rank,
                                         world_size=shard.world_size, deal=self._deal), dtype=torch.int64)
        for batch_index in range(first, len(self)):
            self._reading = (epoch, batch_index)
            (batch,) = next(self._iterator)
            indices, teacher = batch["indices"].view(-1), batch.get("teacher_images")
            real = int((indices != PADDING).sum())  # host tensor: no device sync
            expected = order[batch_index * self.batch_size:(batch_index + 1) * self.batch_size]
            if not torch.equal(indices[:real], expected):
                # The source's stream and this loader's epochs disagree: every later crop would be another's.
                raise _StreamError(f"DALI's training stream is out of step: batch {batch_index} of epoch {epoch} "
                                   f"holds other samples than the epoch's order says")
            # Where the stream stands once this batch is out (a consumer may stop after any batch).
            self._position = (epoch, batch_index + 1) if batch_index + 1 < len(self) else (epoch + 1, 0)
            yield Batch(batch["images"][:real], batch["labels"][:real], indices[:real],
                        None if teacher is None else teacher[:real])



class DaliToDevice:
    """The device stage after `DaliBatches`: HWC images as NCHW views with channels-last strides
    (no copy), moved to the training device when the pipeline ended on the host; labels as int64
    on the device (indices stay on the host)."""

    name = "host-to-device copy"

    def __init__(self, spec: BatchSpec):
        self.spec = spec

    def set_epoch(self, epoch: int) -> None:
        pass

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        images = images.permute(0, 3, 1, 2).to(self.spec.device, non_blocking=True)
        return images.contiguous(memory_format=self.spec.memory_format)

    def __call__(self, batch: Batch) -> Batch:
        teacher = batch.teacher_images
        return Batch(self._images(batch.images),
                     batch.labels.view(-1).to(self.spec.device, torch.int64, non_blocking=True), batch.indices,
                     None if teacher is None else self._images(teacher))


class _finished_with_torch:
    """The batches of a CPU training pipeline, their crops finished by torch (`pipelines.resample`)
    at the epoch's size (and at the teacher's, when it has its own), as dicts with the keys of
    DALI's iterator; endless, as the pipeline's stream."""

    def __init__(self, pipe, finisher: CropFinisher):
        self._pipe = pipe
        self._finish = finisher

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor]]]:
        return self

    def __next__(self) -> tuple[dict[str, torch.Tensor]]:
        crops, params = self._pipe.run()
        params = torch.from_numpy(np.array(params.as_tensor()))  # [B, len(PARAMS)]
        # A batch is one epoch's: one size, which padding samples carry too.
        size, teacher_size = (int(params[0, _PARAM[name]]) for name in ("size", "teacher_size"))
        params = params[params[:, _PARAM["index"]] != PADDING]  # padding samples are not worth resizing
        flips = params[:, _PARAM["flip"]].tolist()
        # The crops are DALI's memory, valid until the next run(): read here, before it. NumPy's
        # array interface wraps them at a fraction of torch.from_dlpack's cost.
        crop = lambda k: torch.from_numpy(np.asarray(crops[k]))  # noqa: E731
        batch = {"images": self._finish(crop, flips, size), "labels": params[:, _PARAM["label"]].contiguous(),
                 "indices": params[:, _PARAM["index"]].contiguous()}
        if teacher_size:
            batch["teacher_images"] = self._finish(crop, flips, teacher_size)
        return (batch,)


def placement(dali_device: str, spec: BatchSpec, *, hw_decoder_load: float, files: list[str],
              cpu_resize: str = "torch") -> Placement:
    if dali_device == "gpu":
        width, height = size_hints(files)
        hints: dict[str, Any] = {"hw_decoder_load": hw_decoder_load}
        if width and height:
            hints.update(preallocate_width_hint=width, preallocate_height_hint=height)
        return Placement(decoder="mixed", to_gpu_after_decode=False, decoder_hints=hints)
    on_cpu = spec.device.type != "cuda"
    return Placement(decoder="cpu", to_gpu_after_decode=not on_cpu, decoder_hints={},
                     finish_with_torch=on_cpu and cpu_resize == "torch")


def build_dali_loaders(dataset: Dataset, *, spec: BatchSpec, seed: int, shard: Shard, num_threads: int,
                       batch_size: int, val_batch_size: int, sizes: SizeSchedule, val_size: int, val_resize: int,
                       dali_device: str, hw_decoder_load: float, cpu_resize: str, prefetch_queue: int,
                       crop_range: CropRange = CropRange(), teacher_image_size: int | None = None,
                       deal: int = 1, drop_last: bool = False) -> Loaders:
    """Training and validation DALI loaders (`DaliBatches`, then `DaliToDevice`) of one process
    (`dali_device`: "gpu", "cpu" or "auto", as `data.dali.device`; the other values as the keys of
    `data` and `data.dali` of the same names)."""
    _require_dali()
    device = resolve_dali_device(dali_device, spec.device)
    place = placement(device, spec, hw_decoder_load=hw_decoder_load, files=list(dataset.train.files),
                      cpu_resize=cpu_resize)

    def batches(split: Split, *, train: bool, size: int, **training: Any) -> DaliBatches:
        return DaliBatches(split, train=train, batch_size=size, place=place, seed=seed, shard=shard, spec=spec,
                           num_threads=num_threads, sizes=sizes, val_size=val_size, val_resize=val_resize,
                           prefetch_queue=prefetch_queue, **training)

    to_device = DaliToDevice(spec)
    return Loaders(Loader(batches(dataset.train, train=True, size=batch_size, teacher_size=teacher_image_size,
                                  crop_range=crop_range, deal=deal, drop_last=drop_last), [to_device]),
                   Loader(batches(dataset.val, train=False, size=val_batch_size), [to_device]),
                   list(dataset.classes))
