"""Dataset layouts, resolved to plain (file, label) lists that every backend reads.

- `imagefolder`: `root/<train_dir>/<class>/**/<image>`, `root/<val_dir>/<class>/**/<image>`
  (`train/` and `val/` unless named otherwise: CIFAR-10's JPEG folders call theirs `test/`).
- `mini-imagenet`: the original project's layout: `root/images/*.jpg`, `root/new_train.csv`,
  `root/new_val.csv` (`,filename,label` with an unnamed index column, WordNet ids as labels),
  `root/classes_name.json` (`{wnid: [index, name]}`); class index = position of the wnid in
  sorted order.
- `filelist`: `root/<train_list>` and `root/<val_list>` with `relative/path label` lines and
  `root/<classes_file>` with one class name per line, in label order.

Every path named by a list is checked before training starts.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastkd.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
Layout = Literal["imagefolder", "mini-imagenet", "filelist"]


@dataclass(frozen=True)
class Split:
    files: tuple[str, ...]
    """Absolute image paths."""
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.files)

    def without(self, drop: set[str]) -> "Split":
        keep = [(f, y) for f, y in zip(self.files, self.labels) if f not in drop]
        return Split(tuple(f for f, _ in keep), tuple(y for _, y in keep))


@dataclass(frozen=True)
class Dataset:
    classes: tuple[str, ...]
    """Class identifiers in label order."""
    train: Split
    val: Split


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def load_dataset(layout: Layout, root: Path, *, train_list: str = "train.txt", val_list: str = "val.txt",
                 classes_file: str = "classes.txt", train_dir: str = "train", val_dir: str = "val") -> Dataset:
    """Resolve a dataset layout into file lists; raises `DataError` naming what is wrong."""
    if not root.is_dir():
        raise DataError(f"data.root: dataset folder not found: {root}")
    if layout == "imagefolder":
        dataset = _load_imagefolder(root, train_dir, val_dir)
    elif layout == "mini-imagenet":
        dataset = _load_mini_imagenet(root)
    else:
        dataset = _load_filelist(root, train_list, val_list, classes_file)
    _check_files_exist(dataset.train, "train")
    _check_files_exist(dataset.val, "val")
    return dataset


def _list_class_folder(folder: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if is_image_file(f)]
    return found


def _scan_split(split_dir: Path, classes: list[str]) -> Split:
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        folder = split_dir / name
        if not folder.is_dir():
            continue
        images = _list_class_folder(folder)
        if not images:
            raise DataError(f"class folder has no images ({', '.join(IMAGE_EXTENSIONS)}): {folder}")
        files += images
        labels += [label] * len(images)
    return Split(tuple(files), tuple(labels))


# Folder names that hold a held-out split in common layouts, suggested when `val_dir` is not found.
_HELD_OUT_NAMES = ("val", "validation", "valid", "test", "eval")


def _class_folders(root: Path, name: str, key: str, other: str) -> list[str]:
    split_dir = root / name
    if not split_dir.is_dir():
        found = [n for n in _HELD_OUT_NAMES if n not in (name, other) and (root / n).is_dir()]
        hint = f"; {root} has {found[0]}/: set data.{key}={found[0]}" if found and key == "val_dir" else ""
        raise DataError(f"data.{key}: imagefolder layout needs {name}/ with one folder per class under data.root: "
                        f"{split_dir} not found{hint}")
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def _load_imagefolder(root: Path, train_dir: str, val_dir: str) -> Dataset:
    train_classes = _class_folders(root, train_dir, "train_dir", val_dir)
    if not train_classes:
        raise DataError(f"no class folders in {root / train_dir}")
    val_classes = _class_folders(root, val_dir, "val_dir", train_dir)
    extra = sorted(set(val_classes) - set(train_classes))
    if extra:
        raise DataError(f"val class folder(s) missing from {train_dir}: {', '.join(extra[:5])}"
                        f"{' ...' if len(extra) > 5 else ''} (in {root / val_dir})")
    train = _scan_split(root / train_dir, train_classes)
    val = _scan_split(root / val_dir, train_classes)  # a class may lack val images; it keeps its label
    if not len(val):
        raise DataError(f"no validation images in {root / val_dir}")
    return Dataset(tuple(train_classes), train, val)


def read_mini_imagenet_csv(path: Path) -> list[tuple[str, str]]:
    """Rows (filename, wnid) of a `new_train.csv`/`new_val.csv` (`,filename,label` header)."""
    if not path.is_file():
        raise DataError(f"mini-imagenet layout needs {path.name}: {path} not found "
                        "(prepare it with `fastkd data mini-imagenet ROOT`)")
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or "filename" not in header or "label" not in header:
            raise DataError(f"{path}: expected a header with 'filename' and 'label' columns, got {header}")
        fi, li = header.index("filename"), header.index("label")
        rows = []
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) <= max(fi, li):
                raise DataError(f"{path}:{line_no}: expected {len(header)} columns, got {row}")
            rows.append((row[fi], row[li]))
    return rows


def _load_mini_imagenet(root: Path) -> Dataset:
    classes_path = root / "classes_name.json"
    train_rows = read_mini_imagenet_csv(root / "new_train.csv")
    val_rows = read_mini_imagenet_csv(root / "new_val.csv")
    if classes_path.is_file():
        try:
            wnids = sorted(json.loads(classes_path.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise DataError(f"{classes_path}: not a JSON object of {{wnid: [index, name]}}: {exc}") from None
    else:
        wnids = sorted({label for _, label in train_rows})
    index = {wnid: i for i, wnid in enumerate(wnids)}

    def split(rows: list[tuple[str, str]], csv_name: str) -> Split:
        unknown = sorted({label for _, label in rows if label not in index})
        if unknown:
            raise DataError(f"{root / csv_name}: label(s) not in classes_name.json: {', '.join(unknown[:5])}")
        return Split(tuple(str(root / "images" / name) for name, _ in rows),
                     tuple(index[label] for _, label in rows))

    return Dataset(tuple(wnids), split(train_rows, "new_train.csv"), split(val_rows, "new_val.csv"))


def read_class_names(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"filelist layout needs a class-name file: {path} not found")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path}: no class names")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"{path}: duplicated class name(s): {', '.join(dup[:5])}")
    return names


def read_file_list(path: Path, root: Path, num_classes: int) -> Split:
    """`relative/path label` lines (the path may contain spaces; the label is the last field)."""
    if not path.is_file():
        raise DataError(f"file list not found: {path}")
    files, labels = [], []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, label = line.rstrip().rpartition(" ")
        if not name or not label.isdigit():
            raise DataError(f"{path}:{line_no}: expected 'relative/path label', got {line!r}")
        if int(label) >= num_classes:
            raise DataError(f"{path}:{line_no}: label {label} out of range for {num_classes} classes")
        files.append(str(root / name.strip()))
        labels.append(int(label))
    if not files:
        raise DataError(f"{path}: no images listed")
    return Split(tuple(files), tuple(labels))


def _load_filelist(root: Path, train_list: str, val_list: str, classes_file: str) -> Dataset:
    classes = read_class_names(root / classes_file)
    return Dataset(tuple(classes), read_file_list(root / train_list, root, len(classes)),
                   read_file_list(root / val_list, root, len(classes)))


def _check_files_exist(split: Split, which: str) -> None:
    missing = [f for f in split.files if not os.path.isfile(f)]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DataError(f"{which} image not found: {missing[0]}{more}")
