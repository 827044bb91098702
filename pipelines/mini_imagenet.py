"""`fastkd data mini-imagenet ROOT`: the original project's 480/120 per-class split.

The raw download is `ROOT/images/*.jpg` plus the few-shot `train.csv`, `val.csv`, `test.csv`
(header `filename,label`, 64/16/20 disjoint classes). The original project merged the three
files, then for each WordNet id in sorted order shuffled that class's rows with pandas'
`DataFrame.sample(frac=1, random_state=1)` and put the first 80% in `new_train.csv`, the rest
in `new_val.csv`, written by `DataFrame.to_csv` (an unnamed index column holding each row's
line number in its source file), plus `classes_name.json` (`{wnid: [index, name]}`).

`sample(frac=1, random_state=n)` draws `numpy.random.RandomState(n).permutation(len(rows))`,
so this needs NumPy only; a test checks the result against pandas itself.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from fastkd.errors import DataError

RAW_FILES = ("train.csv", "val.csv", "test.csv")
TRAIN_FRACTION = 0.8
RANDOM_STATE = 1


def _read_raw(path: Path) -> list[tuple[int, str, str]]:
    """(row index in this file, filename, wnid) of a raw `filename,label` CSV."""
    if not path.is_file():
        raise DataError(f"raw mini-ImageNet list not found: {path}")
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != ["filename", "label"]:
            raise DataError(f"{path}: expected the header 'filename,label', got {header}")
        rows: list[tuple[int, str, str]] = []
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != 2:
                raise DataError(f"{path}:{line_no}: expected 'filename,label', got {row}")
            rows.append((len(rows), row[0], row[1]))
    return rows


def read_class_index(path: Path) -> dict[str, str]:
    """wnid -> name from Keras' `imagenet_class_index.json` (`{"0": [wnid, name], ...}`)."""
    try:
        table = json.loads(path.read_text())
        return {wnid: name for wnid, name in table.values()}
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: not an imagenet_class_index.json ({{index: [wnid, name]}}): {exc}") from None


def split_mini_imagenet(root: Path, class_names: dict[str, str] | None = None) -> dict[str, int]:
    """Write `new_train.csv`, `new_val.csv` and `classes_name.json` into `root`; return counts."""
    if not (root / "images").is_dir():
        raise DataError(f"mini-ImageNet folder needs images/: {root / 'images'} not found")
    rows = [row for name in RAW_FILES for row in _read_raw(root / name)]
    missing = [filename for _, filename, _ in rows if not (root / "images" / filename).is_file()]
    if missing:
        raise DataError(f"image listed but not found: {root / 'images' / missing[0]}"
                        f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}")
    wnids = sorted({wnid for _, _, wnid in rows})
    train: list[tuple[int, str, str]] = []
    val: list[tuple[int, str, str]] = []
    for wnid in wnids:
        members = [row for row in rows if row[2] == wnid]
        order = np.random.RandomState(RANDOM_STATE).permutation(len(members))
        shuffled = [members[i] for i in order]
        num_train = int(len(members) * TRAIN_FRACTION)
        train += shuffled[:num_train]
        val += shuffled[num_train:]
    _write_split(root / "new_train.csv", train)
    _write_split(root / "new_val.csv", val)
    names = class_names or {}
    classes = {wnid: [index, names.get(wnid, wnid)] for index, wnid in enumerate(wnids)}
    (root / "classes_name.json").write_text(json.dumps(classes, indent=4))
    return {"classes": len(wnids), "train": len(train), "val": len(val)}


def _write_split(path: Path, rows: list[tuple[int, str, str]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["", "filename", "label"])
        writer.writerows(rows)
    tmp.replace(path)
