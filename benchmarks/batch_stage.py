"""Images/second of each batch-stage transform (`pipelines/batch_stage.py`) on its own.

    python benchmarks/batch_stage.py [--device cpu|cuda] [--sizes 32 224] [--batch 64] [--out FILE.jsonl]

Times each transform as a training step calls it, on a batch already on the device (fp32 on
the CPU, fp16 on a GPU; channels-last) with its host indices: mixup, CutMix, both (switch
probability 0.5), RandAugment, TrivialAugmentWide. Each uses the draws of one epoch (drawn
once, untimed: a run draws each epoch's at `set_epoch`). Reports the median over `--repeats` windows of `--steps` batches, with the
machine and versions. The stage is not a backend's cost: compare it with the loader and step
rows of `fastkd bench` on the same machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastkd.env import collect_env  # noqa: E402
from pipelines.base import Batch  # noqa: E402
from pipelines.auto_augment import AutoAugment  # noqa: E402
from pipelines.batch_stage import Mixing, MixSpec  # noqa: E402

TRANSFORMS = {
    "mixup": lambda n: Mixing(MixSpec(mixup_alpha=0.8), seed=0, num_items=n),
    "cutmix": lambda n: Mixing(MixSpec(cutmix_alpha=1.0), seed=0, num_items=n),
    "mixup+cutmix": lambda n: Mixing(MixSpec(mixup_alpha=0.8, cutmix_alpha=1.0), seed=0, num_items=n),
    "randaugment": lambda n: AutoAugment("randaugment", seed=0, num_items=n, num_ops=2, magnitude=9),
    "trivialaugment": lambda n: AutoAugment("trivialaugment", seed=0, num_items=n),
}
"""Each transform as `data.*` sets it: mixup alpha 0.8, CutMix alpha 1.0 (switch 0.5); RandAugment
2 ops at magnitude 9 of 31; TrivialAugmentWide."""


def rate(transform, batch: Batch, *, steps: int, repeats: int, sync) -> list[float]:
    for _ in range(3):  # warm-up: allocator, kernels
        transform(batch)
    sync()
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(steps):
            out = transform(batch)
        sync()
        rates.append(steps * batch.size / (time.perf_counter() - started))
    del out
    return rates


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--only", nargs="+", choices=list(TRANSFORMS), help="time only these transforms")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    env = collect_env()
    rows = []
    for size in args.sizes:
        generator = torch.Generator().manual_seed(size)
        images = torch.randn(args.batch, 3, size, size, generator=generator).to(device, dtype)
        images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(1000, (args.batch,), generator=generator).to(device)
        batch = Batch(images, labels, torch.randperm(10 * args.batch, generator=generator)[:args.batch])
        for name, make in TRANSFORMS.items():
            if args.only and name not in args.only:
                continue
            transform = make(10 * args.batch)
            transform.set_epoch(0)
            rates = rate(transform, batch, steps=args.steps, repeats=args.repeats, sync=sync)
            row = {"transform": name, "device": env.get("device", device.type), "dtype": str(dtype), "image_size": size,
                   "batch_size": args.batch, "images_per_sec": round(statistics.median(rates)),
                   "min": round(min(rates)), "max": round(max(rates)), "windows": args.repeats,
                   "steps_per_window": args.steps, "torch": torch.__version__, "cpu": env.get("cpu"),
                   "threads": torch.get_num_threads(), "git": env.get("git"),
                   "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            rows.append(row)
            print(f"{name:>13} {size:>4} px: {row['images_per_sec']:>10,} images/s (min {row['min']:,}, "
                  f"max {row['max']:,}; {args.repeats} windows of {args.steps} batches of {args.batch})", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as out:
            for row in rows:
                out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
