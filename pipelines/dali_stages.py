"""DALI CPU pipelines cut after each stage of the training graph, for `fastkd bench --what
loader-stages`: what each stage costs on the machine at hand, and the ceiling a CPU loader is
measured against (DALI's own random-crop decode, with nothing after it).

Each graph is a prefix of the training path, built with this module's or `dali_backend`'s
operators; the bench times `run()` over whole batches, epoch after epoch (no stage ever resets).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from nvidia.dali import fn, pipeline_def, types

from pipelines.dali_backend import Placement, _normalize, _train_graph, build_pipeline, python_workers
from pipelines.augment import SizeSchedule
from pipelines.dali_source import TrainSamples

CEILING = "random-crop decode"
"""The stage `fastkd bench` reports as the CPU decode ceiling."""

_CPU = Placement(decoder="cpu", to_gpu_after_decode=False, decoder_hints={})


def _reader(files: list[str], labels: list[int]):
    return fn.readers.file(files=files, labels=labels, random_shuffle=True, shuffle_after_epoch=False)


def _stage_graphs(files: list[str], labels: list[int], *, seed: int, batch_size: int,
                  image_size: int) -> dict[str, Callable[[], Any]]:
    def source() -> TrainSamples:
        return TrainSamples(files, labels, seed=seed, rank=0, world_size=1, batch_size=batch_size,
                            sizes=SizeSchedule(image_size))

    def reader_only():
        return tuple(_reader(files, labels))

    def decode():
        jpegs, label = _reader(files, labels)
        return fn.decoders.image(jpegs, output_type=types.RGB), label

    def random_crop_decode():
        jpegs, label = _reader(files, labels)
        return fn.decoders.image_random_crop(jpegs, output_type=types.RGB), label

    def window_decode():  # fastkd's source: the crop's window, decoded; torch finishes it
        return _train_graph(source(), place=dataclasses.replace(_CPU, finish_with_torch=True), dtype=types.FLOAT)

    def dali_resize():
        return _train_graph(source(), place=_CPU, dtype=types.FLOAT)

    def random_crop_resize_normalize():  # the DALI CPU graph of NVIDIA's examples
        jpegs, label = _reader(files, labels)
        images = fn.decoders.image_random_crop(jpegs, output_type=types.RGB)
        images = fn.resize(images, size=[image_size, image_size], antialias=True)
        return _normalize(images, dtype=types.FLOAT, mirror=fn.random.coin_flip()), label

    return {"reader only": reader_only, "full decode": decode, CEILING: random_crop_decode,
            "fastkd crop-window decode": window_decode,
            "random-crop decode + DALI resize + normalize": random_crop_resize_normalize,
            "fastkd crop-window decode + DALI resize + normalize": dali_resize}


STAGES = ("reader only", "full decode", CEILING, "fastkd crop-window decode",
          "random-crop decode + DALI resize + normalize", "fastkd crop-window decode + DALI resize + normalize")
"""The stages `stage_pipeline` builds, in the order the bench prints them."""


def stage_pipeline(stage: str, files: list[str], labels: list[int], *, seed: int, batch_size: int,
                   image_size: int, num_threads: int):
    """A built DALI CPU pipeline that ends after `stage` (one of `STAGES`)."""
    graph = _stage_graphs(files, labels, seed=seed, batch_size=batch_size, image_size=image_size)[stage]
    workers = python_workers(num_threads, gpu=False) if "fastkd" in stage else {}
    pipe = pipeline_def(graph, batch_size=batch_size, num_threads=num_threads, device_id=None, seed=seed,
                        exec_dynamic=True, **workers)()
    build_pipeline(pipe)
    return pipe


def run_endlessly(pipe) -> Callable[[], int]:
    """One batch per call (readers wrap around at an epoch's end; fastkd's source never ends);
    returns the batch size."""
    def one() -> int:
        pipe.run()
        return pipe.max_batch_size

    return one
