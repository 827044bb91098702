"""`fastkd bench`: images/second of the data path, training and distillation, per backend.

The command line becomes a plan of rows (`plan_bench`: what, backend, variant, and why a row
runs that was not asked for), printed before anything is timed. The rows run in one process,
one after another, so ratios compare like with like. Each row times a run built as the command
it stands for builds it (`fastkd.engine.build_run`): its loaders, its step and its update, so a
row times what `fastkd train`/`distill` run with the same config. Each figure is the median of
`repeats` timed windows of `steps` batches after `warmup` batches, with the spread (min, max).
A per-stage breakdown (data wait for the loader's host stage, each of its device stages by
name, teacher forward or cache lookup, student forward+backward, optimizer) is measured in a
separate pass, with CUDA events on a GPU and timers on the CPU, and ends in one sentence naming
the bottleneck.
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

from fastkd import engine
from fastkd.config import Config, DaliConfig, SyntheticConfig
from fastkd.data import checked_dataset
from fastkd.env import collect_env
from fastkd.errors import ConfigError
from fastkd.log import log
from fastkd.loop import Update
from fastkd.report import markdown_table
from fastkd.runtime import Runtime, create_runtime, resolve_threads
from fastkd.steps import DistillationStep, Step
from fastkd.teacher import Teacher, build_live_teacher, teacher_source
from fastkd.features import pooled_width
from fastkd.models import create_model
from fastkd.teacher_cache import FEATURES, CacheKey, CachedTeacher, TeacherCache
from pipelines.base import Batch, HostStage, Loader, Shard, run_stages
from pipelines.loaders import loader_workers
from pipelines.datasets import Dataset

BACKENDS = ("torchvision", "dali-cpu", "dali-gpu", "synthetic")
WHATS = ("loader", "loader-stages", "train", "distill", "distill-cached", "settings")
"""loader-stages: DALI CPU pipelines cut after each stage of the training graph (dali-cpu only;
`pipelines.dali_stages`). distill-cached: the student against logits read from a teacher cache
(`fastkd teacher-cache`), no teacher forward; the cache is a temporary one of random logits
(speed does not depend on them). settings: the student's training step with each of `SETTINGS`
beside the configured one, for its ratio and the time its first batches take (compiling)."""

SETTINGS = {"bf16": "bf16 autocast with channels-last (runtime.precision: bf16, runtime.channels_last: true)",
            "compile": "runtime.compile: true", "one-thread": "runtime.threads: 1",
            "all-threads": "runtime.threads: null"}
"""What the bench's advice may suggest for a student-bound step, each measured by `--what settings`.
The thread count is a CPU setting, where the step and the loader share the cores: a config on
several threads tries one (one-thread), a config on one thread tries torch's default (all-threads)."""
THREAD_SETTINGS: dict[str, int | None] = {"one-thread": 1, "all-threads": None}
"""The `runtime.threads` of each thread setting; a bench tries those whose count differs from the config's."""


STEP_STAGES = ("teacher forward", "cache lookup", "student forward+backward", "optimizer")
"""The stage breakdown's parts of a training step; the others are the loader's."""


@dataclass(frozen=True)
class Window:
    steps: int
    warmup: int
    repeats: int


def backend_config(cfg: Config, backend: str, *, num_classes: int | None = None) -> Config:
    """`cfg` with `backend`'s data settings (the config's DALI settings, or DALI's defaults, with
    its decoder's device); synthetic batches with `num_classes` classes (the dataset's, so that
    the same student is timed)."""
    data = cfg.data
    dali = data.dali or DaliConfig()
    synthetic = data.synthetic or SyntheticConfig()
    if num_classes is not None:
        synthetic = dataclasses.replace(synthetic, num_classes=num_classes)
    sections: dict[str, dict[str, Any]] = {
        "torchvision": {"backend": "torchvision", "dali": None, "synthetic": None},
        "dali-cpu": {"backend": "dali", "dali": dataclasses.replace(dali, device="cpu"), "synthetic": None},
        "dali-gpu": {"backend": "dali", "dali": dataclasses.replace(dali, device="gpu"), "synthetic": None},
        "synthetic": {"backend": "synthetic", "dali": None, "synthetic": synthetic}}
    return dataclasses.replace(cfg, data=dataclasses.replace(data, **sections[backend]))


def skip_reason(backend: str, runtime: Runtime) -> str | None:
    if backend == "dali-gpu" and runtime.device.type != "cuda":
        return "needs a CUDA training device (runtime.device)"
    if backend.startswith("dali"):
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            return "NVIDIA DALI is not installed"
    return None


def endless(source: Loader | HostStage, host_of: Loader | None = None) -> Iterator[Batch]:
    """Full batches of epoch after epoch of a loader (or of its host stage alone).

    With `host_of`, `source` is that loader's host stage: each epoch is then set on the whole
    loader, so its device stages (run by the caller) draw that epoch's augmentations.

    An epoch's partial last batch is skipped: a new batch shape inside a timed window would
    time cuDNN's autotuning or a recompilation instead of the steady state.
    """
    epoch = 0
    while True:
        (source if host_of is None else host_of).set_epoch(epoch)
        for batch in source:
            if batch.size == source.batch_size:
                yield batch
        epoch += 1


@dataclass(frozen=True)
class Timed:
    rates: list[float]
    """Images/second of each timed window."""
    warmup_seconds: float
    """The warm-up batches' wall time: compiling, autotuning and first allocations show here."""


def timed_windows(window: Window, run_one: Callable[[], int], sync: Callable[[], None]) -> Timed:
    """Each timed window's images/second; `run_one` processes one batch, returns its size."""
    started = time.perf_counter()
    for _ in range(window.warmup):
        run_one()
    sync()
    warmup_seconds = time.perf_counter() - started
    rates = []
    for _ in range(window.repeats):
        started, images = time.perf_counter(), 0
        for _ in range(window.steps):
            images += run_one()
        sync()  # window boundary: every queued kernel and copy has finished
        rates.append(images / (time.perf_counter() - started))
    return Timed(rates, warmup_seconds)


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


MIN_TICKS = 10
"""Fewer clock ticks than this between two readings (0.05 s on 2 cores) say nothing of how busy
the machine was: the kernel samples each tick whole, busy or idle."""


def busy_fraction(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of the machine's CPU time that was busy between two `cpu_times()` readings;
    None without readings or over fewer than `MIN_TICKS` ticks."""
    if before is None or after is None or after[0] - before[0] < MIN_TICKS:
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


def _next_batch(stream: Iterator[Batch], loader: Loader, clock: StageClock) -> Batch:
    """The next batch of `loader`: the wait for its host stage (`stream`, of `loader.host`), then
    each of its device stages, timed apart under their names, as the loader runs them."""
    started = time.perf_counter()
    batch = next(stream)
    clock.host_time("data wait", time.perf_counter() - started)
    with loader.guard():
        return run_stages(batch, loader.stages, timed=clock.device)


# -- the plan ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Planned:
    """One row of the plan."""

    what: str
    """loader, loader-stage, train, distill or distill-cached."""
    backend: str
    variant: str = ""
    """A loader-stage row's stage; "no-side-stream" for distillation with the teacher on the
    student's CUDA stream; a `SETTINGS` name for a train row with that setting."""
    why: str = ""
    """Why the row runs when the command line did not ask for it ("" when it did)."""

    @property
    def key(self) -> tuple[str, str, str]:
        return self.what, self.backend, self.variant

    @property
    def label(self) -> str:
        """The row's `what` in the table and the JSONL."""
        return f"{self.what}-{self.variant}" if self.what in ("train", "distill") and self.variant else self.what

    def describe(self) -> str:
        stage = f": {self.variant}" if self.what == "loader-stage" else ""
        return f"{self.label} with {self.backend}{stage}" + (f" ({self.why})" if self.why else "")


def plan_bench(what: Sequence[str], backends: Sequence[str], runtime: Runtime,
               threads: int | None = None) -> tuple[list[Planned], list[str]]:
    """The rows `--what` x `--backends` asks for, in order, each once, with those they need
    beside them; and notes on what is left out. `threads`: the config's `runtime.threads`."""
    plan: list[Planned] = []
    notes: list[str] = []

    def note(text: str) -> None:  # once, whatever the number of backends
        if text not in notes:
            notes.append(text)

    def add(row: Planned) -> None:
        for i, planned in enumerate(plan):
            if planned.key == row.key:
                if not row.why:  # asked for after all
                    plan[i] = row
                return
        plan.append(row)

    for backend in backends:
        reason = skip_reason(backend, runtime)
        if reason:
            notes.append(f"{backend} skipped: {reason}")
            continue
        for item in what:
            if item == "loader":
                add(Planned("loader", backend))
                if backend == "dali-cpu" and runtime.device.type == "cpu":  # on a GPU it is the hybrid path
                    from pipelines.dali_stages import CEILING

                    add(Planned("loader-stage", backend, CEILING, why="the CPU decode ceiling beside the loader"))
            elif item == "loader-stages":
                if backend == "dali-cpu":
                    from pipelines.dali_stages import STAGES

                    for stage in STAGES:
                        add(Planned("loader-stage", backend, stage))
                else:
                    notes.append(f"loader-stages measures dali-cpu pipelines; {backend} has none (--what loader "
                                 "times it)")
            elif item == "train":
                add(Planned("train", backend))
            elif item == "settings":
                add(Planned("train", backend, why="the configured student, for the ratio"))
                for setting in SETTINGS:
                    if setting in THREAD_SETTINGS:  # another thread count, on the CPU, where there is one
                        if runtime.device.type == "cpu" and (
                                resolve_threads(THREAD_SETTINGS[setting]) != resolve_threads(threads)):
                            add(Planned("train", backend, setting))
                        continue
                    if (runtime.precision == "bf16" and runtime.channels_last) if setting == "bf16" else runtime.compile:
                        note(f"settings: {SETTINGS[setting]} is the configured setting, timed as train")
                    elif setting == "bf16" and runtime.device.type == "cuda" and not torch.cuda.is_bf16_supported(
                            including_emulation=False):
                        note("settings: bf16 skipped: this GPU does not support it natively")
                    else:
                        add(Planned("train", backend, setting))
            else:
                add(Planned("train", backend, why="the student alone on the same loader, for the ratio"))
                add(Planned(item, backend))
                if item == "distill" and runtime.device.type == "cuda":
                    add(Planned("distill", backend, "no-side-stream", why="what the side stream saves"))
    return plan, notes


def format_plan(plan: Sequence[Planned], window: Window) -> str:
    lines = [f"bench plan: {len(plan)} row(s), each the median of {window.repeats} window(s) of {window.steps} "
             f"batches after {window.warmup} warm-up batches (more where a loader holds more prefetched):"]
    lines += [f"  {i}. {row.describe()}" for i, row in enumerate(plan, 1)]
    return "\n".join(lines)


# -- rows ----------------------------------------------------------------------------------

@dataclass
class Row:
    """One measured row. `as_dict` is its JSONL record: every field, null where it does not
    apply, beside the run's settings and the machine's versions."""

    what: str
    backend: str
    rates: list[float]
    """Images/second of each timed window."""
    steps: int
    warmup: int
    batch_image_size: int | None = None
    """The side of the images the row's batches had."""
    cpu_busy: float | None = None
    """The machine's busy share while a loader ran alone (warm-up included)."""
    stage: str | None = None
    ceiling: bool | None = None
    dali_threads: int | None = None
    data_wait_fraction: float | None = None
    """The share of the step rows' wall time spent waiting for the next batch."""
    side_stream: bool | None = None
    stages: dict[str, float] | None = None
    """Milliseconds per batch in each stage (`stage_breakdown`)."""
    teacher_cache: str | None = None
    setting: str | None = None
    """The `SETTINGS` name a train row ran with (None: as configured)."""
    warmup_seconds: float | None = None
    """The warm-up batches' wall time (`Timed.warmup_seconds`)."""
    torch_threads: int | None = None
    """torch's intra-op threads while the row ran (`runtime.threads`)."""

    def as_dict(self, settings: dict[str, Any]) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        rates = fields.pop("rates")
        what, backend = fields.pop("what"), fields.pop("backend")
        return {"what": what, "backend": backend, "images_per_sec": round(statistics.median(rates), 1),
                "min": round(min(rates), 1), "max": round(max(rates), 1), "repeats": len(rates),
                "rates": [round(rate, 1) for rate in rates], **fields, **settings}


# -- timing ----------------------------------------------------------------------------------

def warmup_for(window: Window, loader: Loader) -> Window:
    """The window, with warm-up enough to drain what a loader prefetched before timing
    (16 DataLoader workers x 4 hold 64 batches: timing them would time a queue, not decoding)."""
    return dataclasses.replace(window, warmup=max(window.warmup, loader.prefetched_batches + 1))


def time_loader(loader: Loader, window: Window, sync: Callable[[], None]) -> Row:
    """Batches out of the loader alone, and how busy it kept the machine."""
    stream = endless(loader)
    side = [0]

    def one() -> int:
        batch = next(stream)
        side[0] = batch.images.shape[-1]
        return batch.size

    window = warmup_for(window, loader)
    before = cpu_times()
    rates = timed_windows(window, one, sync).rates
    return Row("loader", "", rates, window.steps, window.warmup, batch_image_size=side[0],
               cpu_busy=busy_fraction(before, cpu_times()))


def update_counting_steps(update: Update) -> Callable[[], None]:
    """`update.step` with the optimizer steps numbered from 1, as the loop numbers them (the EMA's
    warm-up reads them)."""
    steps = [0]

    def step() -> None:
        steps[0] += 1
        update.step(steps[0])

    return step


def _timed_step(step: Step, batch: Batch, update: Update, take_step: Callable[[], None], clock: StageClock) -> None:
    """One training step in its named stages: the teacher's forward or the cache lookup, the
    student's forward and backward with the loss, the optimizer (with EMA)."""
    if isinstance(step, DistillationStep):
        stage = "cache lookup" if step.recorded is not None else "teacher forward"
        teacher = clock.device(stage, lambda: step.teacher_outputs(batch.teacher_view, batch.indices))
        clock.device("student forward+backward", lambda: update.backward(step.student_output(batch, teacher).loss))
    else:
        clock.device("student forward+backward", lambda: update.backward(step(batch).loss))
    clock.device("optimizer", take_step)


UNTIMED = "untimed"
"""The stage breakdown's rest on the CPU: the timed windows' time per batch less every named stage's."""


def time_steps(step: Step, loader: Loader, update: Update, window: Window, sync: Callable[[], None],
               clock: StageClock | None = None) -> Row:
    """Training steps as the loop runs them (forward, loss, backward, update, EMA), fed by
    `loader`; the loop's on-device meters are left out.

    With a `clock` (on the CPU, where timers cost nothing and nothing overlaps) the same timed
    batches are also timed stage by stage: the row's `stages` then add up to its windows' time
    per batch, with what no stage names as `untimed`."""
    step.train()
    stream = endless(loader) if clock is None else endless(loader.host, host_of=loader)
    waited, side, calls = [0.0], [0, 0], [0]
    take_step = update_counting_steps(update)
    window = warmup_for(window, loader)

    def one() -> int:
        if clock is not None and calls[0] == window.warmup:  # the first timed batch: time stages from here
            clock.host.clear()
        calls[0] += 1
        started = time.perf_counter()
        batch = next(stream) if clock is None else _next_batch(stream, loader, clock)
        waited[0] += time.perf_counter() - started
        side[0], side[1] = batch.images.shape[-1], batch.size
        if clock is None:
            update.backward(step(batch).loss)
            take_step()
        else:
            _timed_step(step, batch, update, take_step, clock)
        return batch.size

    started = time.perf_counter()
    timed = timed_windows(window, one, sync)
    rates = timed.rates
    row = Row("", "", rates, window.steps, window.warmup, batch_image_size=side[0],
              data_wait_fraction=round(waited[0] / (time.perf_counter() - started), 3),
              warmup_seconds=round(timed.warmup_seconds, 3))
    if clock is not None:
        batches = window.steps * window.repeats
        per_batch = {stage: 1000 * seconds / batches for stage, seconds in clock.seconds().items()}
        windows_ms = 1000 * sum(window.steps * side[1] / rate for rate in rates) / batches
        row.stages = {**{stage: round(ms, 3) for stage, ms in per_batch.items()},
                      UNTIMED: round(windows_ms - sum(per_batch.values()), 3)}
    return row


def stage_breakdown(step: Step, loader: Loader, update: Update, runtime: Runtime, steps: int) -> dict[str, float]:
    """Milliseconds per batch in each stage, over `steps` batches (stages in sequence), on a GPU:
    CUDA events, in a pass of their own after the timed windows.

    `step` must run its teacher on the main stream (`build_step(..., side_stream=False)`), so
    each stage's events time it alone. "data wait" is host time spent waiting for the next
    batch: on a GPU it also holds any wait for DALI's GPU work, which competes with the step
    for the same GPU.
    """
    clock = StageClock(runtime)
    stream = endless(loader.host, host_of=loader)
    take_step = update_counting_steps(update)
    for index in range(steps + 2):
        if index == 2:  # two untimed batches first
            clock = StageClock(runtime)
            runtime.synchronize()
        batch = _next_batch(stream, loader, clock)
        _timed_step(step, batch, update, take_step, clock)
    return {stage: round(1000 * seconds / steps, 3) for stage, seconds in clock.seconds().items()}


# -- running the plan ----------------------------------------------------------------------------

@dataclass
class Bench:
    """What the rows of one plan share: the config, runtime, window, the dataset (loaded once)
    and the settings every record carries."""

    cfg: Config
    runtime: Runtime
    window: Window
    config_path: str
    dataset: Dataset | None = None
    env: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.dataset.classes) if self.dataset is not None else (self.cfg.data.synthetic
                                                                            or SyntheticConfig()).num_classes

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def config(self, backend: str, *, side_stream: bool | None = None, setting: str | None = None) -> Config:
        """The bench's config for `backend` (with `side_stream` for a distillation row's teacher,
        with the `runtime.threads` of a thread setting)."""
        cfg = backend_config(self.cfg, backend, num_classes=self.num_classes)
        if side_stream is not None and cfg.distill is not None:
            cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, side_stream=side_stream))
        if setting in THREAD_SETTINGS:
            cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, threads=THREAD_SETTINGS[setting]))
        return cfg

    def runtime_for(self, setting: str | None) -> Runtime:
        """The runtime with one of `SETTINGS` (None, the thread settings: as configured)."""
        if setting == "bf16":
            return dataclasses.replace(self.runtime, precision="bf16", channels_last=True)
        if setting == "compile":
            return dataclasses.replace(self.runtime, compile=True)
        assert setting is None or setting in THREAD_SETTINGS, setting
        return self.runtime

    def run(self, backend: str, *, teacher: Teacher | None = None, side_stream: bool | None = None,
            setting: str | None = None) -> engine.Run:
        """The run `backend` times, over the dataset loaded once: its student untrained (speed does
        not depend on the weights; a pretrained name would need the network), with `teacher`, with
        `setting` (one of `SETTINGS`)."""
        return engine.build_run(self.config(backend, side_stream=side_stream, setting=setting), self.runtime_for(setting),
                                student="untrained", teacher=teacher or "none", dataset=self.dataset)

    def settings(self, row: Row) -> dict[str, Any]:
        cfg, distills, runtime = self.cfg, row.what.startswith("distill"), self.runtime_for(row.setting)
        dali = cfg.data.dali or DaliConfig()
        return {
            "batch_size": cfg.data.batch_size, "image_size": cfg.data.image_size, "model": cfg.model.arch,
            "teacher": cfg.distill.teacher.arch if cfg.distill and distills else None,
            "teacher_image_size": cfg.distill.teacher.image_size if cfg.distill and distills else None,
            "precision": runtime.precision, "channels_last": runtime.channels_last,
            "compile": runtime.compile, "num_workers": cfg.data.num_workers,
            "dali_prefetch_queue": (dali.prefetch_queue if row.backend.startswith("dali")
                                    and row.what != "loader-stage" else None),
            "dali_cpu_resize": (dali.cpu_resize if row.backend == "dali-cpu"
                                and self.runtime.device.type == "cpu" else None),
            "device": self.env["device"], "cpu_count": self.env["cpu_count"], "torch": self.env["torch"],
            "torchvision": self.env["torchvision"], "dali": self.env["dali"], "git": self.env["git"],
            "config": self.config_path, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def measure(self, planned: Planned) -> Row:
        if planned.what == "loader":
            row = time_loader(self.run(planned.backend).loaders.train, self.window, self.runtime.synchronize)
        elif planned.what == "loader-stage":
            row = self.time_dali_stage(planned.variant)
        else:
            with tempfile.TemporaryDirectory(prefix="fastkd-bench-cache-") as folder:
                row = self.time_step_row(planned, Path(folder))
        row.what, row.backend = planned.label, planned.backend
        row.torch_threads = torch.get_num_threads()  # as the row's run (or time_dali_stage) set it
        return row

    def time_dali_stage(self, stage: str) -> Row:
        """A DALI CPU pipeline ending after `stage` (`pipelines.dali_stages`)."""
        from pipelines.dali_stages import CEILING, run_endlessly, stage_pipeline

        assert self.dataset is not None
        Runtime.set_threads(self.cfg.runtime.threads)  # builds no run: the config's threads, not the last row's
        data = self.cfg.data
        threads = max(1, loader_workers(data.num_workers, Shard(), dali=True))
        pipe = stage_pipeline(stage, list(self.dataset.train.files), list(self.dataset.train.labels),
                              seed=self.cfg.data_seed, batch_size=data.batch_size, image_size=data.image_size,
                              num_threads=threads)
        rates = timed_windows(self.window, run_endlessly(pipe), lambda: None).rates
        del pipe  # its threads and Python workers go before the next row is timed
        return Row("loader-stage", "dali-cpu", rates, self.window.steps, self.window.warmup, stage=stage,
                   ceiling=stage == CEILING, dali_threads=threads)

    def time_step_row(self, planned: Planned, cache_folder: Path) -> Row:
        """The student's training steps alone (`train`), against the live teacher (`distill`) or
        against cached logits (`distill-cached`): each the step and update of a run built as
        `fastkd train`/`distill` builds it; a train row with its `SETTINGS` variant."""
        teacher, side_stream, setting = None, None, None
        if planned.what == "train":
            setting = planned.variant or None
        if planned.what == "distill":  # live, whether or not the config replays a cache
            teacher = self.live_teacher()
            side_stream = False if planned.variant == "no-side-stream" else None
        elif planned.what == "distill-cached":
            teacher = self.synthetic_cache(cache_folder)
        run = self.run(planned.backend, teacher=teacher, side_stream=side_stream, setting=setting)
        assert run.student is not None and run.step is not None and run.update is not None
        loader = run.loaders.train
        # On the CPU the timed windows' own batches are timed stage by stage; on a GPU a pass of its
        # own times them with CUDA events, the teacher apart: the same step, its teacher on the main stream.
        on_gpu = run.runtime.device.type == "cuda"
        clock = None if on_gpu else StageClock(run.runtime)
        row = time_steps(run.step, loader, run.update, self.window, run.runtime.synchronize, clock=clock)
        if on_gpu:
            sequential = engine.build_step(run.cfg, run.runtime, run.student.model, run.teacher, side_stream=False)
            sequential.train()
            row.stages = stage_breakdown(sequential, loader, run.update, run.runtime, self.window.steps)
        live = run.teacher is not None and run.teacher.module is not None
        row.side_stream = run.cfg.distill.side_stream if live and run.cfg.distill is not None else None
        row.teacher_cache = "temporary, random fp16 logits" if planned.what == "distill-cached" else None
        row.setting = setting
        return row

    @property
    def classes(self) -> list[str]:
        """The dataset's classes (every row's: synthetic batches take their number)."""
        return list(self.dataset.classes) if self.dataset is not None else [
            f"class_{i:04d}" for i in range(self.num_classes)]

    def live_teacher(self) -> Teacher:
        """The config's teacher (`fastkd.teacher.build_live_teacher`), or one of random weights when
        its checkpoint is not there (speed does not depend on them)."""
        kd = self.cfg.distill
        assert kd is not None
        path = teacher_source(kd)
        weights = (isinstance(path, str) or path.is_file()) and self.dataset is not None
        if not weights:
            self.note(f"teacher weights: random ({path} not found); speed does not depend on them")
        return build_live_teacher(self.cfg, self.runtime, self.classes, weights=weights)

    def synthetic_cache(self, folder: Path) -> Teacher:
        """A one-epoch teacher cache of random logits for every sample a loader can yield: positions
        in the split (real data) or in the epoch (synthetic batches, one more for a mixed pair)."""
        synthetic = self.cfg.data.synthetic or SyntheticConfig()
        num_samples = max(len(self.dataset.train) if self.dataset is not None else 0, synthetic.train_samples + 1)
        kd = self.cfg.distill
        # with feature distillation, features of the teacher's pooled width
        width = (pooled_width(create_model(kd.teacher.arch, self.num_classes, image_size=self.cfg.data.image_size),
                              "distill.teacher.arch") if kd is not None and kd.feature is not None else None)
        key = CacheKey(dataset="bench", num_samples=num_samples, classes=self.classes, seed=0,
                       image_size=self.cfg.data.image_size, augmentation={}, teacher_arch="bench",
                       teacher_checkpoint="bench", teacher_precision="bench",
                       features=FEATURES if width is not None else None)
        cache = TeacherCache.create_or_resume(folder, key, num_classes=self.num_classes, dtype="fp16",
                                              teacher_val={"val_top1": 0.0, "val_top5": 0.0}, feature_width=width)
        for kind in cache.kinds:
            rows = cache.new_epoch_file(0, kind)
            rows[:] = np.random.default_rng(0).normal(0, 3, size=rows.shape)
            rows.flush()
            del rows
        cache.commit_epoch(0)
        return Teacher(None, CachedTeacher(cache, self.runtime.device, features=width is not None), {"arch": "bench"},
                       feature_width=width)


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
    if cfg.data.size_schedule is not None:  # a schedule would change the size between timed windows
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, size_schedule=None))
        notes.append(f"the size schedule is left out: measured at data.image_size ({cfg.data.image_size} px); "
                     "--image-sizes measures others")
    runtime = create_runtime(cfg.runtime)  # one process: the bench is not a torchrun job
    plan, skipped = plan_bench(what, backends, runtime, cfg.runtime.threads)
    echo(format_plan(plan, window))
    # Any real backend asked for, run or skipped: synthetic rows then have the dataset's classes.
    real = next((backend for backend in backends if backend != "synthetic"), None)
    dataset = None if real is None else checked_dataset(backend_config(cfg, real).data, runtime.shard, is_main=True)
    bench = Bench(cfg, runtime, window, config_path, dataset=dataset, env=collect_env(runtime.device),
                  notes=notes + skipped)
    records = []
    try:
        for i, planned in enumerate(plan, 1):
            log.info(f"[bench] {i}/{len(plan)}: {planned.describe()} ...")  # progress; the results below are the output
            row = bench.measure(planned)
            records.append(row.as_dict(bench.settings(row)))
    finally:  # the process goes on with the config's threads, not the last row's
        Runtime.set_threads(cfg.runtime.threads)
    compare_settings(records)
    for record in records:
        record["notes"] = list(bench.notes)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
    echo(format_rows(records, bench.notes))
    for sentence in loader_sentences(records) + bottleneck_sentences(records, runtime) + settings_sentences(records):
        echo(sentence)
    return records


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
        # the host stage's wait, the loaders' device stages in the order they run, then the step's parts
        device = [name for r in stage_rows for name in r["stages"]
                  if name not in STEP_STAGES and name not in ("data wait", UNTIMED)]
        untimed = [UNTIMED] if any(UNTIMED in r["stages"] for r in stage_rows) else []
        names = ["data wait", *dict.fromkeys(["host-to-device copy", *device]), *STEP_STAGES, *untimed]
        stages = "\n\nms per batch, by stage:\n" + markdown_table(
            ["what", "backend", *names],
            [[r["what"], r["backend"], *[f"{r['stages'].get(n, 0.0):.1f}" for n in names]] for r in stage_rows])
    return header + "\n\n" + table + stages + "".join(f"\n- {n}" for n in notes)


def loader_sentences(rows: list[dict[str, Any]]) -> list[str]:
    """The DALI CPU loader against the machine's decode ceiling and the torchvision DataLoader."""
    ceiling_row = next((r for r in rows if r.get("ceiling")), None)
    loaders = {r["backend"]: r["images_per_sec"] for r in rows if r["what"] == "loader"}
    if ceiling_row is None or "dali-cpu" not in loaders:
        return []
    ceiling = ceiling_row["images_per_sec"]
    rate = loaders["dali-cpu"]
    versus = (f" and {rate / loaders['torchvision']:.2f}x the torchvision DataLoader ({loaders['torchvision']:.0f} "
              "images/s)") if loaders.get("torchvision") else ""
    return [f"The dali-cpu loader yields {rate:.0f} images/s: {rate / ceiling:.0%} of DALI's bare "
            f"{ceiling_row['stage']} on this machine (the ceiling, {ceiling:.0f} images/s){versus}."]


def compare_settings(rows: list[dict[str, Any]]) -> None:
    """Each `SETTINGS` row against the configured train row of its backend: `vs_configured`, its
    images/second's ratio; `beyond_spread`, whether every window of one was faster than every
    window of the other; and for compile `compile_seconds`, the extra wall time of its warm-up
    batches (the same batches, compiled first)."""
    configured = {r["backend"]: r for r in rows if r["what"] == "train" and not r.get("setting")}
    for row in rows:
        base = configured.get(row["backend"]) if row.get("setting") else None
        if base is None:
            continue
        row["vs_configured"] = round(row["images_per_sec"] / base["images_per_sec"], 3)
        row["beyond_spread"] = row["min"] > base["max"] or row["max"] < base["min"]
        if row["setting"] == "compile":
            row["compile_seconds"] = round(max(0.0, row["warmup_seconds"] - base["warmup_seconds"]), 1)


def payback_seconds(ratio: float, compile_seconds: float) -> float | None:
    """The uncompiled training time after which a step `ratio` times as fast, after
    `compile_seconds` of compiling, has saved its compile time (None: it never does)."""
    return compile_seconds / (1 - 1 / ratio) if ratio > 1 else None


CACHED_COMPILE = 1.0
"""Seconds of extra warm-up under which a compile row's code came from inductor's cache."""


def settings_sentences(rows: list[dict[str, Any]]) -> list[str]:
    """What each measured setting did to the student's step, and when compiling pays back."""
    sentences = []
    for row in rows:
        ratio = row.get("vs_configured")
        if ratio is None:
            continue
        name = f"{SETTINGS[row['setting']]} made train with {row['backend']} {ratio:.2f}x as fast"
        if row["setting"] != "compile":
            sentences.append(f"{name}.")
            continue
        if row["compile_seconds"] < CACHED_COMPILE:
            sentences.append(f"{name}; its compiled code came from inductor's cache (compiled before, in this bench or "
                             "on this machine), so its compile time is not measured here.")
            continue
        payback = payback_seconds(ratio, row["compile_seconds"])
        pays = (f"it pays back on runs whose training steps take over {payback:.0f} s uncompiled"
                if payback is not None else "it does not pay back here")
        sentences.append(f"{name}, after {row['compile_seconds']:.0f} s of compiling (with inductor's cache as it "
                         f"stood): {pays} (evaluation compiles once more, and every new batch shape again).")
    return sentences


HELPS = 1.05
"""A measured setting is advised when it made the step at least this much faster, every window of
it faster than every window as configured."""


def measured_settings(rows: list[dict[str, Any]], backend: str) -> tuple[list[str], list[str]]:
    """The settings `--what settings` measured on `backend`: those that helped (at least `HELPS`
    times as fast, beyond the windows' spread), with their ratio, and those that did not."""
    measured = [r for r in rows if r["backend"] == backend and r.get("vs_configured") is not None]
    helps = [f"{SETTINGS[r['setting']].split(' (')[0]} ({r['vs_configured']:.2f}x here)" for r in measured
             if r["vs_configured"] >= HELPS and r.get("beyond_spread")]
    slower = [f"{r['setting']} {r['vs_configured']:.2f}x"
              + (", within the windows' spread" if r["vs_configured"] >= HELPS else "") for r in measured
              if not (r["vs_configured"] >= HELPS and r.get("beyond_spread"))]
    return helps, slower


def student_advice(rows: list[dict[str, Any]], backend: str, runtime: Runtime) -> str:
    """What to try for a student-bound step: the settings `--what settings` measured faster on this
    backend; unmeasured, only what is known to help on the device."""
    helps, slower = measured_settings(rows, backend)
    if helps or slower:
        return ", ".join([*helps, "or a larger batch" if helps else "a larger batch"]) + (
            f" (measured not to help: {', '.join(slower)})" if slower else "")
    # Unmeasured: on a 2-core AMD EPYC (AVX512-BF16) bf16 autocast made ShuffleNet-v2 x0.5 and
    # ResNet-18 0.71x and 0.94x as fast (issue 39), so a CPU is not told to try it.
    if runtime.device.type == "cuda":
        return "bf16 with channels-last (runtime.precision), runtime.compile, or a larger batch (--what settings measures them)"
    return ("runtime.compile (it compiles for tens of seconds first, so it pays on runs of minutes; --what "
            "settings measures it), or a larger batch")


def bottleneck_sentences(rows: list[dict[str, Any]], runtime: Runtime) -> list[str]:
    """One plain sentence per measured training/distillation row (as configured): what bounds it,
    what to try."""
    sentences = []
    ceilings = {r["what"]: r["images_per_sec"] for r in rows if r["backend"] == "synthetic" and not r.get("setting")}
    for row in rows:
        stages = row.get("stages")
        if not stages or row.get("setting"):
            continue
        data = sum(ms for name, ms in stages.items() if name not in (*STEP_STAGES, UNTIMED))  # host and device stages
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
                advice = ("decode on the GPU (data.dali.device: gpu)" if runtime.device.type == "cuda"
                          else "raise data.num_workers (DALI threads) or decode on a GPU")
                helps, _ = measured_settings(rows, row["backend"])  # one thread for the step leaves the loader a core
                advice += "".join(f", or {setting}" for setting in helps)
            else:
                advice = "raise data.num_workers (DALI threads) and data.dali.hw_decoder_load"
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
            advice = student_advice(rows, row["backend"], runtime)
            sentences.append(f"{name} is bounded by the student ({student:.1f} ms per batch against {data:.1f} ms "
                             f"of data{f' and {teacher:.1f} ms of teacher' if teacher else ''}){ideal}: try {advice}.")
    return sentences
