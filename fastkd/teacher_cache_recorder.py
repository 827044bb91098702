"""`fastkd teacher-cache`: the frozen teacher run over epochs 0..E-1 of a run's training stream
(the exact crops a student will see), its logits stored per (epoch, sample) into the cache
folder of `fastkd.teacher_cache`.

Finished epochs are kept: a second call resumes or extends the cache. Under torchrun every rank
runs the teacher on its shard and sends its rows to rank 0, which alone writes the files (no file
is shared between processes or nodes).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from fastkd.distributed import from_rank_0
from fastkd.env import device_name
from fastkd.errors import ConfigError, DataError
from fastkd.log import log
from fastkd.loop import Interrupted, StopFlag, stop_on_signals
from fastkd.runtime import ResolvedPrecision, Runtime
from fastkd.steps import frozen_forward
from fastkd.teacher import Teacher, teacher_cache_key
from fastkd.teacher_cache import DTYPES, TeacherCache, effective_top_k
from pipelines.base import Loader

if TYPE_CHECKING:
    from fastkd.engine import Run


def record(run: "Run", *, epochs: int, dtype: str, top_k: int | None, progress: bool) -> dict[str, Any]:
    """Record the epochs of `run`'s stream its cache lacks with its live teacher; `top_k` keeps
    each sample's K largest logits and a rest logit (`fastkd.teacher_cache.encode_top_k`)."""
    cfg, runtime, loaders, teacher = run.cfg, run.runtime, run.loaders, run.teacher
    kd = cfg.distill
    assert kd is not None and teacher is not None and teacher.module is not None, "recording needs the live teacher"
    key = teacher_cache_key(cfg, runtime, run.dataset, loaders.classes)
    kept = effective_top_k(top_k, len(loaders.classes))
    if top_k is not None and kept is None and runtime.is_main:
        log.info(f"teacher cache: top-{top_k} keeps all {len(loaders.classes)} classes: recording every logit")
    manifest = None
    if runtime.is_main:  # rank 0 alone opens the folder; the others record from its manifest
        cache = TeacherCache.create_or_resume(
            kd.teacher_cache_path, key, num_classes=len(loaders.classes), dtype=dtype,
            teacher_val={"val_top1": teacher.about["val_top1"], "val_top5": teacher.about["val_top5"]},
            recorded_with=_recording_setup(run), top_k=kept, feature_width=teacher.feature_width)
        cache.remove_stale_files()  # left by a recording killed midway
        manifest = cache.manifest
    cache = TeacherCache(kd.teacher_cache_path, from_rank_0(manifest))
    different = cache.key.difference(key)
    if different:  # another rank's data or teacher (another node's copy of them)
        raise ConfigError(f"distill.teacher_cache: rank {runtime.shard.rank}'s run differs from rank 0's "
                          f"({different})")
    precision = runtime.resolve_precision(kd.teacher.precision)
    todo = [epoch for epoch in range(epochs) if epoch not in cache.recorded_epochs]
    stop = StopFlag()
    with stop_on_signals(stop):
        for epoch in todo:
            _record_epoch(cache, epoch, teacher, loaders.train, runtime, precision, progress=progress, stop=stop)
            if epoch != todo[-1] and agree_to_stop(stop, runtime):  # a stop in an epoch's last batch: after it
                raise Interrupted(epoch, stop.signum, kept=f"the teacher cache {cache.path} with "
                                                           f"{cache.describe_epochs()}")
    return {"path": str(kd.teacher_cache_path), "epochs": epochs, "recorded_now": todo, "dtype": dtype,
            "top_k": cache.top_k, "num_samples": key.num_samples, "teacher": teacher.about}


def _recording_setup(run: "Run") -> dict[str, Any]:
    """How the logits were computed, beyond the key: replays elsewhere are close, not bit-exact."""
    cfg, runtime = run.cfg, run.runtime
    # the device's model, the same on every rank (not rank k's "cuda:k")
    return {"backend": cfg.data.backend, "dali_device": cfg.data.dali.device if cfg.data.dali else None,
            "device": device_name(runtime.device), "batch_dtype": str(runtime.batch_spec.dtype),
            "channels_last": runtime.channels_last, "batch_size": cfg.data.batch_size,
            "world_size": runtime.shard.world_size}


def agree_to_stop(stop: StopFlag, runtime: Runtime) -> bool:
    """Whether to stop after this batch; under torchrun every rank calls it after every batch and
    all take the same decision (a stop on any rank stops all, before the next all-gather)."""
    if not runtime.distributed:
        return stop.requested
    flag = torch.tensor([float(stop.requested)], device=runtime.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() and not stop.signum:  # host sync: recording, not training
        stop.signum = 15
    return stop.requested


def _record_epoch(cache: TeacherCache, epoch: int, teacher: Teacher, loader: Loader, runtime: Runtime,
                  precision: ResolvedPrecision, *, progress: bool, stop: StopFlag) -> None:
    """One epoch's logits (and pooled features, when the cache holds them) into temporary files,
    committed once every sample has its row; an epoch that fails or is stopped (SIGTERM/SIGINT
    between batches: `Interrupted`) leaves nothing behind."""
    assert teacher.module is not None
    kinds = cache.kinds
    files = {kind: cache.new_epoch_file(epoch, kind) for kind in kinds} if runtime.is_main else None
    written = np.zeros(cache.key.num_samples, dtype=bool)
    dtype = cache.manifest["dtype"]
    largest = float(np.finfo(DTYPES[dtype]).max)
    loader.set_epoch(epoch)
    batches = tqdm(loader, total=len(loader), desc=f"teacher logits, epoch {epoch}", leave=False,
                   disable=None if (progress and runtime.is_main) else True)
    for number, batch in enumerate(batches, 1):
        logits = frozen_forward(teacher.module, batch.teacher_view, autocast=lambda: runtime.autocast(precision),
                                input_dtype=runtime.input_dtype(precision)).float()
        outputs = {"logits": logits}
        if "features" in kinds:
            assert teacher.taps is not None
            features, _ = teacher.taps.take()
            assert features is not None
            outputs["features"] = features.float()
        outputs["indices"] = torch.from_numpy(batch.sample_indices()).to(runtime.device)
        if runtime.distributed:  # every rank's batch has the same size (shards are padded equal)
            outputs = {name: _all_gathered(tensor, runtime.shard.world_size) for name, tensor in outputs.items()}
        for kind in kinds:  # every rank checks the same gathered rows, so all stop together
            _check_range(outputs[kind], kind, largest, epoch, cache, precision, files)
        if files is not None:
            index = outputs["indices"].cpu().numpy()  # host sync: recording, not training
            cache.write_rows(files["logits"], index, outputs["logits"])
            if "features" in files:
                cache.write_features(files["features"], index, outputs["features"])
            written[index] = True
        if number < len(loader) and agree_to_stop(stop, runtime):  # after the last batch, the epoch is committed
            batches.close()
            if files is not None:
                del files
                cache.remove_stale_files()  # the epoch in progress: its temporary files
            raise Interrupted(epoch, stop.signum, kept=f"the teacher cache {cache.path} with "
                                                     f"{cache.describe_epochs()} (epoch {epoch} was in progress)")
    if files is None:
        return
    for rows in files.values():
        rows.flush()
    del files, rows
    if not written.all():
        raise DataError(f"teacher cache: epoch {epoch} left {int((~written).sum())} sample(s) without logits")
    cache.commit_epoch(epoch)
    log.info(f"teacher cache: epoch {epoch} recorded ({cache.describe_epochs()})")


def _all_gathered(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor)
    return torch.cat(parts)


def _check_range(values: torch.Tensor, kind: str, largest: float, epoch: int, cache: TeacherCache,
                 precision: ResolvedPrecision, files: dict[str, np.memmap] | None) -> None:
    """Refuse values the cache's dtype cannot hold (an fp16 file keeps an overflowing logit as
    inf, and a student replaying it meets a NaN loss), removing the epoch's temporary files."""
    peak = float(values.abs().amax())  # host sync: recording, not training; NaN stays NaN
    if math.isfinite(peak) and peak <= largest:
        return
    if files is not None:
        files.clear()  # the memory maps close before their files go
        for other in cache.kinds:
            cache.temp_epoch_path(epoch, other).unlink(missing_ok=True)
    dtype = cache.manifest["dtype"]
    if not math.isfinite(peak):
        what = "are not finite (nan/inf)"
        hint = ("its forward overflowed in fp16 (set distill.teacher.precision: fp32 or bf16), or its checkpoint "
                "is broken" if precision == "fp16" else f"its checkpoint is broken (its forward ran in {precision})")
    else:
        what = f"reach {peak:.4g}, beyond {dtype}'s range"
        hint = ("record with --dtype fp32" if not cache.recorded_epochs else
                f"the cache's epochs so far are {dtype}: delete {cache.path} and record it with --dtype fp32")
        hint += ", or use a teacher that trained stably"
    name = "logits" if kind == "logits" else "pooled features"
    raise DataError(f"teacher cache: the teacher's {name} {what} in epoch {epoch}: {hint}; nothing of this epoch "
                    "was recorded")
