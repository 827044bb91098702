"""Teacher-cache replay at ImageNet-1k scale: rows per second read by random batches.

    python benchmarks/cache_replay.py --out /tmp/replay [--rows 1281167] [--classes 1000] [--top-k 1 5 10]

Writes one synthetic epoch (random logits) per storage kind into OUT with fastkd's own cache
format and writer (`fastkd.teacher_cache`): every logit in fp16, and the top-K records. Then
replays each as a distillation run does (`CachedTeacher` on the CPU: the gather from the
memory-mapped file, and for top-K the rebuild of [B, C] logits), by batches of `--batch-size`
random rows in an epoch's shuffled order, and prints rows/second: with the file in the page
cache (warm); after asking the kernel to drop its pages (cold, `posix_fadvise DONTNEED`: a
disk read per row); and cold but started as a run starts an epoch (`CachedTeacher.set_epoch`
asks the kernel to read the file ahead, `WILLNEED`). Prints one table; `--jsonl` appends rows.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from fastkd.env import collect_env
from fastkd.report import markdown_table
from fastkd.teacher_cache import CacheKey, CachedTeacher, TeacherCache


def write_cache(folder: Path, rows: int, classes: int, top_k: int | None, chunk: int = 65536) -> TeacherCache:
    key = CacheKey(dataset="synthetic", num_samples=rows, classes=[str(c) for c in range(classes)], seed=0,
                   image_size=224, augmentation={}, teacher_arch="synthetic", teacher_checkpoint="synthetic",
                   teacher_precision="bf16")
    if (folder / "manifest.json").is_file():
        cache = TeacherCache.open(folder, key, epochs=1, verify=False, source="--out", top_k=top_k)
        if cache.recorded_epochs == [0]:
            return cache
    cache = TeacherCache.create_or_resume(folder, key, num_classes=classes, dtype="fp16", top_k=top_k,
                                          teacher_val={"val_top1": 0.0, "val_top5": 0.0})
    generator = torch.Generator().manual_seed(0)
    epoch_rows = cache.new_epoch_file(0)
    for start in range(0, rows, chunk):
        index = np.arange(start, min(rows, start + chunk))
        cache.write_rows(epoch_rows, index, torch.randn(len(index), classes, generator=generator) * 4)
    epoch_rows.flush()
    del epoch_rows
    cache.commit_epoch(0)
    return TeacherCache.open(folder, key, epochs=1, verify=False, source="--out", top_k=top_k)


def drop_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_through(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def replay_rate(cache: TeacherCache, batch_size: int, batches: int, seed: int, advise: bool = False) -> float:
    """Rows/s of `batches` random batches; with `advise` the epoch starts as a run's does
    (`CachedTeacher.set_epoch`: the kernel is asked to read the file ahead), timed from there."""
    teacher = CachedTeacher(cache, torch.device("cpu"))
    order = torch.from_numpy(np.random.default_rng(seed).permutation(cache.key.num_samples))
    started = time.perf_counter()
    if advise:
        teacher.set_epoch(0)
    for b in range(batches):
        logits = teacher(order[b * batch_size:(b + 1) * batch_size])
    assert logits.shape == (batch_size, cache.manifest["num_classes"])
    return batches * batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the synthetic caches (GBs)")
    parser.add_argument("--rows", type=int, default=1_281_167, help="samples per epoch (ImageNet-1k's train set)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--top-k", type=int, nargs="*", default=[1, 5, 10])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=400, help="batches per timed pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jsonl", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)  # a training process gathers on its own thread
    env = collect_env()
    table, records = [], []
    for top_k in [None, *args.top_k]:
        name = "full" if top_k is None else f"top{top_k}"
        started = time.perf_counter()
        cache = write_cache(args.out / name, args.rows, args.classes, top_k)
        written = time.perf_counter() - started
        path = cache.epoch_path(0)
        size = path.stat().st_size
        rates = {}
        for state in ("warm", "cold", "advised"):
            runs = []
            for repeat in range(args.repeats):
                if state == "warm":
                    read_through(path)  # every page in memory
                else:
                    drop_page_cache(path)
                runs.append(replay_rate(cache, args.batch_size, args.batches, seed=repeat,
                                        advise=state == "advised"))
            rates[state] = sorted(runs)
        record = {"storage": name, "bytes_per_epoch": size, "bytes_per_row": cache.row_dtype.itemsize *
                  (1 if top_k else args.classes), "rows": args.rows, "classes": args.classes,
                  "batch_size": args.batch_size, "warm_rows_per_sec": rates["warm"], "cold_rows_per_sec": rates["cold"],
                  "advised_rows_per_sec": rates["advised"],
                  "write_seconds": round(written, 1), "device": env["device"], "torch": env["torch"],
                  "git": env["git"], "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        records.append(record)
        median = lambda xs: xs[len(xs) // 2]  # noqa: E731
        table.append([name, f"{size / 1e9:.3f} GB", f"{record['bytes_per_row']}",
                      f"{median(rates['warm']):,.0f} ({rates['warm'][0]:,.0f}-{rates['warm'][-1]:,.0f})",
                      f"{median(rates['cold']):,.0f} ({rates['cold'][0]:,.0f}-{rates['cold'][-1]:,.0f})",
                      f"{median(rates['advised']):,.0f} ({rates['advised'][0]:,.0f}-{rates['advised'][-1]:,.0f})"])
        print(f"[replay] {name}: {size / 1e9:.3f} GB, warm {median(rates['warm']):,.0f} rows/s, cold "
              f"{median(rates['cold']):,.0f}, cold with read-ahead {median(rates['advised']):,.0f}", flush=True)
    print(f"{env['device']} | torch {env['torch']} | {args.rows:,} rows x {args.classes} classes | batches of "
          f"{args.batch_size} random rows | median of {args.repeats} passes of {args.batches} batches (min-max)")
    print(markdown_table(["storage", "per epoch", "bytes per row", "warm rows/s", "cold rows/s",
                          "cold, read-ahead advised (as a run starts an epoch)"], table))
    if args.jsonl:
        with args.jsonl.open("a") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
