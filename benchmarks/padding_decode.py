"""What a padding sample costs DALI's CPU decoder: its file's 16x16 top-left corner
(`pipelines.dali_source.PADDING_SIDE`) against a random-resized crop window, on the demo's JPEGs.

    python benchmarks/padding_decode.py [--root ~/.cache/fastkd/demo-v1/train]

Each kind is timed twice, alternating (batch 64, 2 DALI threads, 30 batches after 3 of warm-up).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from nvidia.dali import fn, pipeline_def, types


@pipeline_def(batch_size=64, num_threads=2, device_id=None)
def decode(root: str, kind: str):
    jpegs, _ = fn.readers.file(file_root=root, random_shuffle=False)
    if kind == "corner":
        return fn.decoders.image_slice(jpegs, [0, 0], [16, 16], device="cpu", output_type=types.RGB, axis_names="WH",
                                       normalized_anchor=False, normalized_shape=False)
    return fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB)


def images_per_second(root: str, kind: str, *, warmup: int = 3, batches: int = 30) -> float:
    pipe = decode(root, kind)
    pipe.build()
    for _ in range(warmup):
        pipe.run()
    started = time.perf_counter()
    for _ in range(batches):
        pipe.run()
    return 64 * batches / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="~/.cache/fastkd/demo-v1/train")
    root = str(Path(parser.parse_args().root).expanduser())
    for kind in ("crop", "corner", "crop", "corner"):
        print(f"{kind:>6}: {images_per_second(root, kind):,.0f} images/s")


if __name__ == "__main__":
    main()
