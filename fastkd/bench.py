"""`fastkd bench`: images/second of the data path, training and distillation, per backend.

All selected measurements run in one process, one after another, so ratios compare like with
like. Each figure is the median of `repeats` timed windows of `steps` batches after `warmup`
batches, with the spread (min, max). A per-stage breakdown (data wait, host-to-device copy,
teacher forward, student forward+backward, optimizer) is measured in a separate pass, with
CUDA events on a GPU and timers on the CPU, and ends in one sentence naming the bottleneck.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from fastkd.config import Config
from fastkd.engine import build_distillation_step, student_normalization
from fastkd.env import collect_env
from fastkd.errors import ConfigError
from fastkd.log import log
from fastkd.models import (attach_input_normalization, create_model, freeze, is_weights_name, load_teacher,
                           resolve_normalization)
from fastkd.loop import apply_update, backward
from fastkd.optim import create_optimizer, optimizer_params
from fastkd.report import markdown_table
from fastkd.runtime import Runtime, create_runtime, seed_everything
from fastkd.steps import ClassificationStep, DistillationStep
from fastkd.teacher_cache import CacheKey, CachedTeacher, TeacherCache
from fastkd.data import build_loaders, load_data
from pipelines.base import Loader, Shard
from pipelines.loaders import loader_workers
from pipelines.datasets import Dataset

BACKENDS = ("torchvision", "dali-cpu", "dali-gpu", "synthetic")
WHATS = ("loader", "loader-stages", "train", "distill", "distill-cached")
"""loader-stages: DALI CPU pipelines cut after each stage of the training graph (dali-cpu only;
`pipelines.dali_stages`). distill-cached: the student against logits read from a teacher cache
(`fastkd teacher-cache`), no teacher forward; the cache is a temporary one of random logits
(speed does not depend on them)."""


@dataclass(frozen=True)
class Window:
    steps: int
    warmup: int
    repeats: int


def backend_overrides(backend: str) -> dict[str, Any]:
    return {"torchvision": {"backend": "torchvision"}, "dali-cpu": {"backend": "dali", "dali_device": "cpu"},
            "dali-gpu": {"backend": "dali", "dali_device": "gpu"}, "synthetic": {"backend": "synthetic"}}[backend]


def skip_reason(backend: str, runtime: Runtime) -> str | None:
    if backend == "dali-gpu" and runtime.device.type != "cuda":
        return "needs a CUDA training device (runtime.device)"
    if backend.startswith("dali"):
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            return "NVIDIA DALI is not installed"
    return None


def endless(loader: Loader, batches: Callable[[Loader], Iterator] | None = None) -> Iterator:
    """Full batches of epoch after epoch (of `batches(loader)`, default the loader itself).

    An epoch's partial last batch is skipped: a new batch shape inside a timed window would
    time cuDNN's autotuning or a recompilation instead of the steady state.
    """
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        for batch in (batches or iter)(loader):
            if batch[1].shape[0] == loader.batch_size:
                yield batch
        epoch += 1


def timed_windows(window: Window, run_one: Callable[[], int], sync: Callable[[], None]) -> list[float]:
    """Images/second of each timed window; `run_one` processes one batch, returns its size."""
    for _ in range(window.warmup):
        run_one()
    sync()
    rates = []
    for _ in range(window.repeats):
        started, images = time.perf_counter(), 0
        for _ in range(window.steps):
            images += run_one()
        sync()  # window boundary: every queued kernel and copy has finished
        rates.append(images / (time.perf_counter() - started))
    return rates


def cpu_times() -> tuple[int, int] | None:
    """(ours, idle) time of every CPU since boot, in clock ticks (Linux's /proc/stat), else None.

    "Ours" leaves out steal (a hypervisor running other machines on our cores) and the guest
    fields (already counted in user and nice)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(value) for value in f.readline().split()[1:8]]  # user .. softirq
    except (OSError, ValueError):
        return None
    return sum(ticks), ticks[3] + ticks[4]  # idle + iowait


def busy_fraction(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of the machine's CPU time that was busy between two `cpu_times()` readings."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    return round(1 - (after[1] - before[1]) / (after[0] - before[0]), 3)


class StageClock:
    """Accumulates per-stage time: CUDA events on a GPU (read once at the end), timers on the CPU."""

    def __init__(self, runtime: Runtime):
        self.cuda = runtime.device.type == "cuda"
        self.runtime = runtime
        self.host: dict[str, float] = {}
        self.events: list[tuple[str, Any, Any]] = []

    def host_time(self, stage: str, seconds: float) -> None:
        self.host[stage] = self.host.get(stage, 0.0) + seconds

    def device(self, stage: str, fn: Callable[[], Any]) -> Any:
        if not self.cuda:
            started = time.perf_counter()
            out = fn()
            self.host_time(stage, time.perf_counter() - started)
            return out
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        self.events.append((stage, start, end))
        return out

    def seconds(self) -> dict[str, float]:
        self.runtime.synchronize()
        totals = dict(self.host)
        for stage, start, end in self.events:
            totals[stage] = totals.get(stage, 0.0) + start.elapsed_time(end) / 1000.0
        return totals


def _next_batch(stream: Iterator, loader: Loader, clock: StageClock):
    """Next (images, labels, indices, teacher images); host wait and host-to-device copy are timed separately."""
    started = time.perf_counter()
    images, labels, indices, teacher = next(stream)
    clock.host_time("data wait", time.perf_counter() - started)
    if not hasattr(loader, "to_device"):
        return images, labels, indices, teacher

    def copy():
        return (*loader.to_device(images, labels), None if teacher is None else loader.images_to_device(teacher))

    images, labels, teacher = clock.device("host-to-device copy", copy)
    return images, labels, indices, teacher


def _stage_stream(loader: Loader) -> Iterator:
    """Endless full host-stage batches with indices (device batches for loaders without stages)."""
    return endless(loader, lambda l: l.host_batches() if hasattr(l, "host_batches") else l.indexed())


@dataclass
class Bench:
    cfg: Config
    runtime: Runtime
    window: Window
    config_path: str
    dataset: Dataset | None = None
    env: dict[str, Any] = dataclasses.field(default_factory=dict)
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def loaders(self, backend: str, *, teacher_view: bool = False):
        """The backend's loaders; `teacher_view`: with the teacher's own view of each crop, if it has one."""
        data = dataclasses.replace(self.cfg.data, **backend_overrides(backend))
        teacher_size = self.cfg.distill.teacher.image_size if teacher_view and self.cfg.distill else None
        if backend == "synthetic":
            data = dataclasses.replace(data, synthetic_num_classes=self.num_classes)
            return build_loaders(data, spec=self.runtime.batch_spec, seed=self.cfg.data_seed,
                                 teacher_image_size=teacher_size)
        return build_loaders(data, spec=self.runtime.batch_spec, seed=self.cfg.data_seed, dataset=self.dataset,
                             teacher_image_size=teacher_size)

    @property
    def num_classes(self) -> int:
        return len(self.dataset.classes) if self.dataset is not None else self.cfg.data.synthetic_num_classes

    def record(self, what: str, backend: str, rates: list[float], *, warmup: int, **extra: Any) -> dict[str, Any]:
        cfg = self.cfg
        row = {
            "what": what, "backend": backend, "images_per_sec": round(statistics.median(rates), 1),
            "min": round(min(rates), 1), "max": round(max(rates), 1), "repeats": len(rates),
            "rates": [round(rate, 1) for rate in rates],
            "steps": self.window.steps, "warmup": warmup, "batch_size": cfg.data.batch_size,
            "image_size": cfg.data.image_size, "model": cfg.model.arch,
            "teacher": cfg.distill.teacher.arch if cfg.distill and what.startswith("distill") else None,
            "teacher_image_size": cfg.distill.teacher.image_size if cfg.distill and what.startswith("distill") else None,
            "precision": self.runtime.precision, "channels_last": self.runtime.channels_last,
            "compile": self.runtime.compile, "num_workers": cfg.data.num_workers,
            "dali_cpu_resize": (cfg.data.dali_cpu_resize if backend == "dali-cpu" and self.runtime.device.type == "cpu"
                                else None), **extra,
            "device": self.env["device"], "cpu_count": self.env["cpu_count"], "torch": self.env["torch"],
            "torchvision": self.env["torchvision"], "dali": self.env["dali"], "git": self.env["git"],
            "config": self.config_path, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self.rows.append(row)
        return row

    # -- measurements ------------------------------------------------------------------

    def window_for(self, loader: Loader) -> Window:
        """The bench window, with warm-up enough to drain what a loader prefetched before timing
        (16 DataLoader workers x 4 hold 64 batches: timing them would time a queue, not decoding)."""
        prefetched = getattr(loader, "prefetched_batches", 0)
        return dataclasses.replace(self.window, warmup=max(self.window.warmup, prefetched + 1))

    def measure_loader(self, backend: str) -> None:
        loader = self.loaders(backend).train
        stream = endless(loader)
        side = [0]

        def one() -> int:
            images, labels = next(stream)
            side[0] = images.shape[-1]
            return labels.shape[0]

        window = self.window_for(loader)
        before = cpu_times()
        rates = timed_windows(window, one, self.runtime.synchronize)
        # Of the whole machine, warm-up included: how much of the cores the loader kept busy.
        self.record("loader", backend, rates, warmup=window.warmup, batch_image_size=side[0],
                    cpu_busy=busy_fraction(before, cpu_times()),
                    dali_prefetch_queue=self.cfg.data.dali_prefetch_queue if backend.startswith("dali") else None)

    def measure_dali_stages(self, stages: Sequence[str]) -> None:
        """Images/second of DALI CPU pipelines ending after each of `stages` (`pipelines.dali_stages`)."""
        from pipelines.dali_stages import CEILING, run_endlessly, stage_pipeline

        assert self.dataset is not None
        data = self.cfg.data
        threads = max(1, loader_workers(data.num_workers, Shard(), dali=True))
        for stage in stages:
            if any(r["what"] == "loader-stage" and r.get("stage") == stage for r in self.rows):
                continue
            pipe = stage_pipeline(stage, list(self.dataset.train.files), list(self.dataset.train.labels),
                                  seed=self.cfg.data_seed, batch_size=data.batch_size, image_size=data.image_size,
                                  num_threads=threads)
            rates = timed_windows(self.window, run_endlessly(pipe), lambda: None)
            del pipe  # its threads and Python workers go before the next stage is timed
            self.record("loader-stage", "dali-cpu", rates, warmup=self.window.warmup, stage=stage,
                        ceiling=stage == CEILING, dali_threads=threads)

    def _student(self) -> tuple[nn.Module, torch.optim.Optimizer, torch.amp.GradScaler]:
        seed_everything(self.cfg.run.seed, deterministic=False)
        model = create_model(self.cfg.model.arch, self.num_classes, image_size=self.cfg.data.image_size)
        attach_input_normalization(model, student_normalization(self.cfg.model))  # as training does
        model, raw = self.runtime.prepare_model(model, trainable=True)
        return model, create_optimizer(raw, self.cfg.optim, self.runtime.device), self.runtime.create_scaler()

    def _teacher(self) -> nn.Module:
        kd = self.cfg.distill
        assert kd is not None
        path = kd.teacher.checkpoint if is_weights_name(kd.teacher.checkpoint) else kd.teacher.checkpoint_path
        if (isinstance(path, str) or path.is_file()) and self.dataset is not None:
            teacher = load_teacher(kd.teacher.arch, path, list(self.dataset.classes), image_size=self.cfg.data.image_size,
                                   mean=kd.teacher.mean, std=kd.teacher.std)
        else:
            self.note(f"teacher weights: random ({path} not found); speed does not depend on them")
            teacher = freeze(create_model(kd.teacher.arch, self.num_classes, image_size=self.cfg.data.image_size,
                                          key="distill.teacher.arch"))
            attach_input_normalization(teacher, resolve_normalization(kd.teacher.arch, kd.teacher.mean,
                                                                      kd.teacher.std))
        return self.runtime.prepare_model(teacher, trainable=False)[0]

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def _synthetic_cache(self, loader: Loader, folder: Path) -> CachedTeacher:
        """A one-epoch teacher cache of random logits for every sample the loader can yield."""
        # Indices are positions in the split (real data) or in the epoch (synthetic batches).
        num_samples = max(len(self.dataset.train) if self.dataset is not None else 0, loader.num_samples)
        key = CacheKey(dataset="bench", num_samples=num_samples, classes=[str(i) for i in range(self.num_classes)],
                       seed=0, image_size=self.cfg.data.image_size, augmentation={}, teacher_arch="bench",
                       teacher_checkpoint="bench", teacher_precision="bench")
        cache = TeacherCache.create_or_resume(folder, key, num_classes=self.num_classes, dtype="fp16",
                                              teacher_val={"val_top1": 0.0, "val_top5": 0.0})
        rows = cache.new_epoch_file(0)
        rows[:] = np.random.default_rng(0).normal(0, 3, size=rows.shape)
        rows.flush()
        del rows
        cache.commit_epoch(0)
        return CachedTeacher(cache, self.runtime.device)

    def measure_steps(self, what: str, backend: str, *, side_stream: bool | None = None) -> dict[str, Any]:
        """Training steps (`train`), teacher + student steps (`distill`) or student steps against
        cached teacher logits (`distill-cached`), fed by one backend."""
        with tempfile.TemporaryDirectory(prefix="fastkd-bench-cache-") as folder:
            return self._measure_steps(what, backend, side_stream=side_stream, cache_folder=Path(folder))

    def _measure_steps(self, what: str, backend: str, *, side_stream: bool | None, cache_folder: Path) -> dict[str, Any]:
        loader = self.loaders(backend, teacher_view=what == "distill").train
        model, optimizer, scaler = self._student()
        if what == "train":
            step: nn.Module = ClassificationStep(model, autocast=self.runtime.autocast)
        elif what == "distill":
            assert self.cfg.distill is not None
            step = build_distillation_step(self.cfg.distill, self.runtime, model, self._teacher(),
                                           side_stream=bool(side_stream))
        else:
            assert self.cfg.distill is not None
            step = build_distillation_step(self.cfg.distill, self.runtime, model, None, side_stream=False,
                                           recorded=self._synthetic_cache(loader, cache_folder))
        step.train()
        params = optimizer_params(optimizer)
        stream = endless(loader, lambda l: l.indexed())
        waited, side = [0.0], [0]

        def one() -> int:
            started = time.perf_counter()
            images, labels, indices, teacher_images = next(stream)
            waited[0] += time.perf_counter() - started
            side[0] = images.shape[-1]
            backward(step(images, labels, indices, teacher_images).loss, optimizer, scaler)
            apply_update(optimizer, scaler, params, None)
            return labels.shape[0]

        started = time.perf_counter()
        window = self.window_for(loader)
        rates = timed_windows(window, one, self.runtime.synchronize)
        wait_fraction = waited[0] / (time.perf_counter() - started)
        label = what if side_stream in (None, True) or self.runtime.device.type != "cuda" else f"{what}-no-side-stream"
        extra = {"teacher_cache": "temporary, random fp16 logits"} if what == "distill-cached" else {}
        stages = self.breakdown(loader, step, optimizer, scaler)
        return self.record(label, backend, rates, warmup=window.warmup, data_wait_fraction=round(wait_fraction, 3),
                           side_stream=side_stream if what == "distill" else None, stages=stages,
                           batch_image_size=side[0], **extra)

    def breakdown(self, loader: Loader, step: nn.Module, optimizer, scaler) -> dict[str, float]:
        """Milliseconds per batch in each stage, over `window.steps` batches (stages in sequence).

        The teacher runs on the main stream here, so each stage's events time it alone.
        "data wait" is host time spent waiting for the next batch: on a GPU it also holds any
        wait for DALI's GPU work, which competes with the step for the same GPU.
        """
        side = getattr(step, "stream", None)
        if isinstance(step, DistillationStep):
            step.stream = None
        try:
            return self._breakdown(loader, step, optimizer, scaler)
        finally:
            if isinstance(step, DistillationStep):
                step.stream = side

    def _breakdown(self, loader: Loader, step: nn.Module, optimizer, scaler) -> dict[str, float]:
        params = optimizer_params(optimizer)
        clock = StageClock(self.runtime)
        stream = _stage_stream(loader)
        for index in range(self.window.steps + 2):
            if index == 2:  # two untimed batches first
                clock = StageClock(self.runtime)
                self.runtime.synchronize()
            images, labels, indices, teacher_images = _next_batch(stream, loader, clock)
            teacher_view = images if teacher_images is None else teacher_images
            if isinstance(step, DistillationStep):
                stage = "cache lookup" if step.recorded is not None else "teacher forward"
                teacher_logits = clock.device(stage, lambda: step.teacher_logits(teacher_view, indices))
                clock.device("student forward+backward", lambda: backward(
                    step.student_output(images, labels, teacher_logits).loss, optimizer, scaler))
            else:
                clock.device("student forward+backward", lambda: backward(step(images, labels).loss, optimizer,
                                                                           scaler))
            clock.device("optimizer", lambda: apply_update(optimizer, scaler, params, None))
        totals = clock.seconds()
        return {stage: round(1000 * seconds / self.window.steps, 3) for stage, seconds in totals.items()}


def run_bench(cfg: Config, *, config_path: str, what: Sequence[str], backends: Sequence[str], window: Window,
              out: Path | None = None, echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    for item in what:
        if item not in WHATS:
            raise ConfigError(f"--what: {item!r} is not one of {', '.join(WHATS)}")
    for backend in backends:
        if backend not in BACKENDS:
            raise ConfigError(f"--backends: {backend!r} is not one of {', '.join(BACKENDS)}")
    for item in ("distill", "distill-cached"):
        if item in what and cfg.distill is None:
            raise ConfigError(f"--what {item} needs a config with a distill section (the teacher's arch)")
    notes = []
    if cfg.data.start_image_size is not None:  # a schedule would change the size between timed windows
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, start_image_size=None, size_ramp_epochs=None))
        notes.append(f"the size schedule is left out: measured at data.image_size ({cfg.data.image_size} px); "
                     "--image-sizes measures others")
    runtime = create_runtime(cfg.runtime)
    dataset = None
    if any(b != "synthetic" for b in backends):
        if cfg.data.generate_demo:
            from fastkd.synth import ensure_demo_dataset

            ensure_demo_dataset(cfg.data.root_path)
        dataset = load_data(cfg.data)
    bench = Bench(cfg, runtime, window, config_path, dataset=dataset, env=collect_env(runtime.device), notes=notes)
    for backend in backends:
        reason = skip_reason(backend, runtime)
        if reason:
            bench.note(f"{backend} skipped: {reason}")
            continue
        for item in what:
            log.info(f"[bench] {item} with {backend} ...")  # progress; the results below are the output
            if item == "loader":
                bench.measure_loader(backend)
                if backend == "dali-cpu" and runtime.device.type == "cpu":  # on a GPU it is the hybrid path
                    from pipelines.dali_stages import CEILING

                    bench.measure_dali_stages([CEILING])
            elif item == "loader-stages":
                if backend == "dali-cpu":
                    from pipelines.dali_stages import STAGES

                    bench.measure_dali_stages(STAGES)
                else:
                    bench.note(f"loader-stages measures dali-cpu pipelines; {backend} has none (--what loader times it)")
            elif item == "train":
                bench.measure_steps("train", backend)
            else:
                if "train" not in what and not any(r["what"] == "train" and r["backend"] == backend for r in bench.rows):
                    bench.measure_steps("train", backend)  # the same student alone, same loader
                if item == "distill-cached":
                    bench.measure_steps("distill-cached", backend)
                    continue
                bench.measure_steps("distill", backend, side_stream=True)
                if runtime.device.type == "cuda":
                    bench.measure_steps("distill", backend, side_stream=False)
    for row in bench.rows:
        row["notes"] = list(bench.notes)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            for row in bench.rows:
                f.write(json.dumps(row) + "\n")
    echo(format_rows(bench.rows, bench.notes))
    for sentence in loader_sentences(bench.rows) + bottleneck_sentences(bench.rows, runtime):
        echo(sentence)
    return bench.rows


def format_rows(rows: list[dict[str, Any]], notes: Sequence[str] = ()) -> str:
    if not rows:
        return "no measurements" + "".join(f"\n- {n}" for n in notes)
    first = rows[0]
    header = (f"{first['device']} | torch {first['torch']} | torchvision {first['torchvision']} | "
              f"DALI {first['dali']} | {first['cpu_count']} CPU cores | {first['precision']} | "
              f"batch {first['batch_size']} | {first['image_size']} px | median of {first['repeats']} x "
              f"{first['steps']} batches")
    table = markdown_table(
        ["what", "backend", "model", "images/s", "min", "max", "data wait", "CPU busy"],
        [[r["what"], r["backend"] + (f": {r['stage']}" if r.get("stage") else ""),
          r["model"] + (f" <- {r['teacher']}" if r.get("teacher") else ""),
          f"{r['images_per_sec']:.1f}", f"{r['min']:.1f}", f"{r['max']:.1f}",
          f"{r['data_wait_fraction']:.0%}" if r.get("data_wait_fraction") is not None else "",
          f"{r['cpu_busy']:.0%}" if r.get("cpu_busy") is not None else ""] for r in rows])
    stage_rows = [r for r in rows if r.get("stages")]
    stages = ""
    if stage_rows:
        names = ["data wait", "host-to-device copy", "teacher forward", "cache lookup", "student forward+backward",
                 "optimizer"]
        stages = "\n\nms per batch, by stage:\n" + markdown_table(
            ["what", "backend", *names],
            [[r["what"], r["backend"], *[f"{r['stages'].get(n, 0.0):.1f}" for n in names]] for r in stage_rows])
    return header + "\n\n" + table + stages + "".join(f"\n- {n}" for n in notes)


def loader_sentences(rows: list[dict[str, Any]]) -> list[str]:
    """The DALI CPU loader against the machine's decode ceiling and the torchvision DataLoader."""
    ceiling_row = next((r for r in rows if r.get("ceiling")), None)
    ceiling = ceiling_row["images_per_sec"] if ceiling_row else None
    loaders = {r["backend"]: r["images_per_sec"] for r in rows if r["what"] == "loader"}
    if ceiling is None or "dali-cpu" not in loaders:
        return []
    rate = loaders["dali-cpu"]
    versus = (f" and {rate / loaders['torchvision']:.2f}x the torchvision DataLoader ({loaders['torchvision']:.0f} "
              "images/s)") if loaders.get("torchvision") else ""
    return [f"The dali-cpu loader yields {rate:.0f} images/s: {rate / ceiling:.0%} of DALI's bare "
            f"{ceiling_row['stage']} on this machine (the ceiling, {ceiling:.0f} images/s){versus}."]


def bottleneck_sentences(rows: list[dict[str, Any]], runtime: Runtime) -> list[str]:
    """One plain sentence per measured training/distillation row: what bounds it, what to try."""
    sentences = []
    ceilings = {r["what"]: r["images_per_sec"] for r in rows if r["backend"] == "synthetic"}
    for row in rows:
        stages = row.get("stages")
        if not stages:
            continue
        data = stages.get("data wait", 0.0) + stages.get("host-to-device copy", 0.0)
        teacher = stages.get("teacher forward", 0.0) + stages.get("cache lookup", 0.0)
        student = stages.get("student forward+backward", 0.0) + stages.get("optimizer", 0.0)
        name = f"{row['what']} with {row['backend']}"
        ceiling = ceilings.get(row["what"])
        # On a CPU the loader also slows the step down by taking cores from it, which no
        # stage shows: compare with the synthetic ceiling measured in the same process.
        starved = row["backend"] != "synthetic" and ceiling and row["images_per_sec"] < 0.8 * ceiling
        if data >= max(teacher, student) or starved:
            if row["backend"] == "torchvision":
                advice = "decode with DALI (data.backend: dali)"
            elif row["backend"] == "dali-cpu":
                advice = ("decode on the GPU (data.dali_device: gpu)" if runtime.device.type == "cuda"
                          else "raise data.num_workers (DALI threads) or decode on a GPU")
            else:
                advice = "raise data.num_workers (DALI threads) and data.dali_hw_decoder_load"
            share = f", {row['images_per_sec'] / ceiling:.0%} of the synthetic-data ceiling" if ceiling else ""
            sentences.append(f"{name} is bounded by the loader ({data:.1f} ms of data wait per batch against "
                             f"{student + teacher:.1f} ms of compute{share}"
                             f"{'; its decoding shares the CPU cores with the step' if runtime.device.type == 'cpu' else ''})"
                             f": {advice}.")
        elif teacher >= student:
            advice = ("keep distill.side_stream on, lower distill.teacher.precision, or try runtime.compile"
                      if runtime.device.type == "cuda" else "use a GPU, where the teacher overlaps the student on a "
                      "side stream, or a smaller teacher")
            sentences.append(f"{name} is bounded by the teacher ({teacher:.1f} ms forward per batch against "
                             f"{student:.1f} ms for the student): {advice}.")
        else:
            ideal = ""
            if teacher:
                ideal = f"; the compute bound with a sequential teacher is {1 / (1 + teacher / student):.0%} of the student alone"
            sentences.append(f"{name} is bounded by the student ({student:.1f} ms per batch against {data:.1f} ms "
                             f"of data{f' and {teacher:.1f} ms of teacher' if teacher else ''}){ideal}: try "
                             "bf16 with channels-last, runtime.compile, or a larger batch.")
    return sentences
