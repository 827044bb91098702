"""GPU readiness on a CPU: what the GPU-only branches would do, checked where no GPU is.

A CUDA copy of host data synchronizes the host unless it is queued from pinned (page-locked)
memory with `non_blocking=True`; inside `runtime.no_host_sync()` (a training step, the loader's
device stages, the teacher cache's replay) `runtime.sync_debug` turns such a copy into an error,
and without it the copy silently stalls the step. `TransferAudit` finds them on the CPU: `meta`
plays the GPU (every op runs, shapes and dtypes included, without data), pinned memory is
emulated (a tensor "pinned" by `pin_memory()` or `pin_memory=True` is a copy the audit
remembers), and every transfer of host data to the stand-in device is recorded with whether it
would block.
"""

from __future__ import annotations

import contextlib
import traceback
import tracemalloc
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

from fastkd.ema import ModelEma
from fastkd.losses import distillation_term
from fastkd.config import DistillConfig, OptimConfig, TeacherConfig
from fastkd.loop import Update, train_step
from fastkd.metrics import Meter, NonFiniteGuard
from fastkd.optim import create_optimizer
from fastkd.steps import ClassificationStep, DistillationStep
from fastkd.teacher_cache import CacheKey, CachedTeacher, TeacherCache
from pipelines.auto_augment import OPS, AutoAugment
from pipelines.base import Batch, BatchSpec, run_stages
from pipelines.batch_stage import Mixing, MixSpec
from pipelines.torchvision_backend import ToDevice

STAND_IN = torch.device("meta")
aten = torch.ops.aten


class TransferAudit(TorchDispatchMode):
    """Records every host-to-device transfer that would block a CUDA run (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._pinned: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
        self.blocking: list[str] = []
        self.transfers = 0

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        self._pinned[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage()
        return tensor

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return tensor.untyped_storage().data_ptr() in self._pinned

    def _transfer(self, source: torch.Tensor, non_blocking: bool, what: str) -> None:
        self.transfers += 1
        if not non_blocking:
            self._blocked(f"{what} of {tuple(source.shape)} {source.dtype}: blocking (non_blocking=False)")
        elif not self.is_pinned(source):
            self._blocked(f"{what} of {tuple(source.shape)} {source.dtype}: from pageable memory")

    def _blocked(self, what: str) -> None:
        """Record `what`, where in fastkd or pipelines it was issued."""
        ours = [f for f in traceback.extract_stack() if "/fastkd/" in f.filename or "/pipelines/" in f.filename]
        where = f" at {Path(ours[-1].filename).parent.name}/{Path(ours[-1].filename).name}:{ours[-1].lineno} " \
                f"({ours[-1].name})" if ours else ""
        self.blocking.append(what + where)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten.is_pinned.default:
            return self.is_pinned(args[0])
        if func is aten._pin_memory.default:
            return self.pin(args[0].clone())
        if kwargs.get("pin_memory"):  # a factory asked for page-locked memory
            return self.pin(func(*args, **{**kwargs, "pin_memory": False}))
        if func is aten._to_copy.default and args[0].device.type == "cpu" and kwargs.get("device") == STAND_IN:
            self._transfer(args[0], bool(kwargs.get("non_blocking")), "a copy (.to)")
        if func is aten.copy_.default and args[1].device.type == "cpu" and args[0].device == STAND_IN:
            self._transfer(args[1], bool(args[2] if len(args) > 2 else kwargs.get("non_blocking")), "a copy (copy_)")
        return func(*args, **kwargs)

    # torch.tensor(data, device=...) builds on the host and copies without dispatching: watched apart
    def __enter__(self):
        self._factories = {name: getattr(torch, name) for name in ("tensor", "as_tensor")}
        for name, factory in self._factories.items():
            setattr(torch, name, self._watched(name, factory))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, factory in self._factories.items():
            setattr(torch, name, factory)
        return super().__exit__(*exc)

    def _watched(self, name, factory):
        def made(data, *args, **kwargs):
            out = factory(data, *args, **kwargs)
            if out.device == STAND_IN and not isinstance(data, torch.Tensor):
                self.transfers += 1
                self._blocked(f"torch.{name}(host data, device=...) of {tuple(out.shape)}: from pageable memory")
            return out
        return made


def host_batch(size: int = 64, side: int = 24, teacher_side: int = 32) -> Batch:
    """A torchvision-backend host batch as its DataLoader hands it over on a GPU run (`pin_memory`):
    uint8 NHWC pixels, labels and indices, pinned; the teacher's view at its own size."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (size, side, side, 3), dtype=torch.uint8, generator=generator)
    teacher = torch.randint(0, 256, (size, teacher_side, teacher_side, 3), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (size,), generator=generator)
    return Batch(pixels.pin_memory(), labels.pin_memory(), torch.arange(size).pin_memory(), teacher.pin_memory())


def test_the_audit_catches_a_blocking_copy_and_passes_a_queued_one():
    audit = TransferAudit()
    with audit:
        host = torch.ones(4)
        host.to(STAND_IN)  # pageable, blocking
        host.to(STAND_IN, non_blocking=True)  # pageable: a CUDA copy still waits for it
        torch.tensor([1.0, 2.0], device=STAND_IN)
        torch.arange(4, device=STAND_IN) ^ 1  # made on the device: no transfer at all
        host.pin_memory().to(STAND_IN, non_blocking=True)  # the one right way
        torch.empty(4, pin_memory=True).to(STAND_IN, non_blocking=True)
    assert audit.transfers == 5 and len(audit.blocking) == 3, audit.blocking


def test_the_loaders_device_stages_copy_host_data_without_blocking():
    """The copy to the device and its normalization, RandAugment (every op: its per-size grids and
    kernels made on the device) and mixup/CutMix (its partner table), from the first batch on."""
    spec = BatchSpec(device=STAND_IN, dtype=torch.float16)
    stages = [ToDevice(spec), AutoAugment("randaugment", seed=0, num_items=64, num_ops=3),
              Mixing(MixSpec(mixup_alpha=0.8, cutmix_alpha=1.0), seed=0, num_items=64)]
    for stage in stages:
        stage.set_epoch(0)
    audit = TransferAudit()
    with audit:
        batch = host_batch()
        for _ in range(2):  # the first batch makes the per-size constants, the second reuses them
            out = run_stages(batch, stages)
    augment = stages[1]
    assert {OPS[o] for o in np.unique(augment._draws[0][:64])} == set(OPS)  # every op ran
    assert augment._kernels and augment._grids  # its constants were made in the audited calls
    assert out.images.device == STAND_IN and out.mix is not None and out.teacher_images.shape[-1] == 32
    assert audit.transfers >= 8
    assert audit.blocking == [], "\n".join(audit.blocking)


def recorded_cache(folder: Path, *, num_samples: int, num_classes: int, top_k: int | None) -> TeacherCache:
    key = CacheKey(dataset="audit", num_samples=num_samples, classes=[str(c) for c in range(num_classes)], seed=0,
                   image_size=24, augmentation={}, teacher_arch="audit", teacher_checkpoint="audit",
                   teacher_precision="fp32")
    cache = TeacherCache.create_or_resume(folder, key, num_classes=num_classes, dtype="fp16", top_k=top_k,
                                          teacher_val={"val_top1": 0.0, "val_top5": 0.0})
    rows = cache.new_epoch_file(0)
    cache.write_rows(rows, np.arange(num_samples), torch.randn(num_samples, num_classes, generator=torch.Generator()
                                                                .manual_seed(1)))
    rows.flush()
    del rows
    cache.commit_epoch(0)
    return cache


@pytest.mark.parametrize("teacher", ["live", "every logit", "top-3"])
def test_a_training_step_queues_its_host_data_without_blocking(tmp_path, teacher):
    """A step as the loop runs it (`fastkd.loop.train_step`: forward and loss, backward, the update
    with clipping and EMA, the on-device meters), distilling from a live teacher or replaying a
    teacher cache (every logit, or top-k): nothing in it waits for a host-to-device copy."""
    student = torchvision.models.shufflenet_v2_x0_5(num_classes=10).to(STAND_IN)
    optim = OptimConfig(lr=0.1, grad_clip_norm=1.0)
    update = Update(create_optimizer(student, optim, STAND_IN), torch.amp.GradScaler("cpu", enabled=False),
                    grad_clip_norm=optim.grad_clip_norm, ema=ModelEma(student, decay=0.9))
    kd = DistillConfig(teacher=TeacherConfig(arch="resnet18", checkpoint="t.pt"))
    if teacher == "live":
        module, recorded = torchvision.models.resnet18(num_classes=10).to(STAND_IN).eval(), None
    else:
        module, recorded = None, CachedTeacher(recorded_cache(tmp_path, num_samples=64, num_classes=10,
                                                              top_k=3 if teacher == "top-3" else None), STAND_IN)
    step = DistillationStep(student, module, term=distillation_term(kd), kd_weight=0.9, ce_weight=0.1,
                            autocast=contextlib.nullcontext, teacher_autocast=contextlib.nullcontext, recorded=recorded)
    step.set_epoch(0)
    meter, guard = Meter(STAND_IN), NonFiniteGuard(STAND_IN)  # made at an epoch's start, outside the step
    images = torch.empty(8, 3, 24, 24, device=STAND_IN).contiguous(memory_format=torch.channels_last)
    audit = TransferAudit()
    with audit:
        batch = Batch(images, torch.zeros(8, dtype=torch.int64, device=STAND_IN), torch.arange(8, 16))
        for number in (1, 2):
            out = train_step(step, update, batch, meter, guard, number)
    assert out.loss.device == STAND_IN
    assert audit.blocking == [], "\n".join(audit.blocking)
    assert audit.transfers == (0 if teacher == "live" else 2)  # the cached rows, once per step


def test_a_classification_step_moves_nothing_to_the_device():
    model = torchvision.models.resnet18(num_classes=10).to(STAND_IN)
    update = Update(create_optimizer(model, OptimConfig(), STAND_IN), torch.amp.GradScaler("cpu", enabled=False))
    step = ClassificationStep(model, autocast=contextlib.nullcontext, label_smoothing=0.1)
    meter, guard = Meter(STAND_IN), NonFiniteGuard(STAND_IN)  # made at an epoch's start, outside the step
    audit = TransferAudit()
    with audit:
        batch = Batch(torch.empty(4, 3, 24, 24, device=STAND_IN), torch.zeros(4, dtype=torch.int64, device=STAND_IN),
                      torch.arange(4))
        train_step(step, update, batch, meter, guard, 1)
    assert audit.transfers == 0


def test_the_cache_replay_gathers_rows_straight_into_pinned_memory(tmp_path):
    """A replayed batch's rows go from the memory-mapped file into the pinned buffer the copy is
    queued from, with no temporary copy on the host (numpy's `take` makes one in its default
    mode="raise", even with `out=`)."""
    cache = recorded_cache(tmp_path, num_samples=1024, num_classes=1000, top_k=None)
    replay = CachedTeacher(cache, STAND_IN)
    replay.set_epoch(0)
    indices = torch.from_numpy(np.random.default_rng(0).permutation(1024)[:256])
    with TransferAudit():
        replay(indices)  # the file opened and checked once
        tracemalloc.start()
        try:
            logits, _ = replay(indices)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    rows_bytes = 256 * 1000 * 2
    assert logits.shape == (256, 1000) and peak < rows_bytes / 10, f"{peak} bytes allocated gathering {rows_bytes}"
