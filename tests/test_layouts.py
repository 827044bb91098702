"""Dataset layouts (mini-ImageNet, file lists) for both backends, and the mini-ImageNet split."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from fastkd.cli import main
from fastkd.errors import DataError
from fastkd.data import build_loaders
from pipelines.datasets import load_dataset
from pipelines.mini_imagenet import split_mini_imagenet
from tests.conftest import CPU, data_config, require_backend

WNIDS = ["n01532829", "n01558993", "n01704323", "n01749939", "n01770081"]


def make_raw_mini_imagenet(root: Path, source: Path, per_class: int = 10) -> None:
    """The raw download's shape: images/ plus train/val/test.csv with disjoint classes."""
    (root / "images").mkdir(parents=True)
    images = sorted(source.rglob("*.jpg"))
    splits = {"train.csv": WNIDS[:3], "val.csv": WNIDS[3:4], "test.csv": WNIDS[4:]}
    i = 0
    for name, wnids in splits.items():
        with (root / name).open("w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["filename", "label"])
            for wnid in wnids:
                for k in range(per_class):
                    filename = f"{wnid}{k:08d}.jpg"
                    shutil.copy(images[i % len(images)], root / "images" / filename)
                    writer.writerow([filename, wnid])
                    i += 1


def test_split_matches_pandas_sample_with_random_state_1(tmp_path, tiny_imagefolder):
    pd = pytest.importorskip("pandas")
    root = tmp_path / "mini"
    make_raw_mini_imagenet(root, tiny_imagefolder)
    counts = split_mini_imagenet(root)
    assert counts == {"classes": 5, "train": 40, "val": 10}

    # The original project's procedure, run with pandas.
    data = pd.concat([pd.read_csv(root / name) for name in ("train.csv", "val.csv", "test.csv")], axis=0)
    train_parts, val_parts = [], []
    for label in sorted(set(data["label"])):
        class_data = data[data["label"] == label]
        shuffled = class_data.sample(frac=1, random_state=1)
        num_train = int(class_data.shape[0] * 0.8)
        train_parts.append(shuffled[:num_train])
        val_parts.append(shuffled[num_train:])
    expected_train = tmp_path / "pandas_train.csv"
    expected_val = tmp_path / "pandas_val.csv"
    pd.concat(train_parts, axis=0).to_csv(expected_train)
    pd.concat(val_parts, axis=0).to_csv(expected_val)
    assert (root / "new_train.csv").read_text() == expected_train.read_text()
    assert (root / "new_val.csv").read_text() == expected_val.read_text()
    classes = json.loads((root / "classes_name.json").read_text())
    assert classes == {wnid: [i, wnid] for i, wnid in enumerate(WNIDS)}


def test_cli_prepares_the_layout_with_names_from_a_class_index(tmp_path, tiny_imagefolder, capsys):
    root = tmp_path / "mini"
    make_raw_mini_imagenet(root, tiny_imagefolder, per_class=5)
    index = tmp_path / "imagenet_class_index.json"
    index.write_text(json.dumps({str(i): [wnid, f"name{i}"] for i, wnid in enumerate(WNIDS)}))
    main(["data", "mini-imagenet", str(root), "--class-index", str(index)])
    assert "new_train.csv (20 images), new_val.csv (5)" in capsys.readouterr().out
    assert json.loads((root / "classes_name.json").read_text())[WNIDS[2]] == [2, "name2"]


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_mini_imagenet_layout_loads_with_sorted_wnid_labels(tmp_path, tiny_imagefolder, backend):
    require_backend(backend)
    root = tmp_path / "mini"
    make_raw_mini_imagenet(root, tiny_imagefolder)
    split_mini_imagenet(root)
    dataset = load_dataset("mini-imagenet", root)
    assert list(dataset.classes) == WNIDS
    with (root / "new_val.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [dataset.classes[y] for y in dataset.val.labels] == [r["label"] for r in rows]
    loaders = build_loaders(data_config(root, backend, format="mini-imagenet"), spec=CPU, seed=0)
    labels = torch.cat([batch.labels for batch in loaders.val]).tolist()
    assert sorted(labels) == sorted(dataset.val.labels)


def test_mini_imagenet_image_missing_from_images_is_named(tmp_path, tiny_imagefolder):
    root = tmp_path / "mini"
    make_raw_mini_imagenet(root, tiny_imagefolder)
    split_mini_imagenet(root)
    victim = next((root / "images").iterdir())
    victim.unlink()
    with pytest.raises(DataError, match=f"image not found: {victim}"):
        load_dataset("mini-imagenet", root)


def write_filelist(root: Path, source: Path) -> None:
    dataset = load_dataset("imagefolder", source)
    shutil.copytree(source, root)
    (root / "classes.txt").write_text("\n".join(dataset.classes) + "\n")
    for name, split in (("train.txt", dataset.train), ("val.txt", dataset.val)):
        lines = [f"{Path(f).relative_to(source)} {y}" for f, y in zip(split.files, split.labels)]
        (root / name).write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_filelist_layout_matches_the_imagefolder_it_lists(tmp_path, tiny_imagefolder, backend):
    require_backend(backend)
    root = tmp_path / "lists"
    write_filelist(root, tiny_imagefolder)
    listed = load_dataset("filelist", root)
    folder = load_dataset("imagefolder", root)
    assert listed.classes == folder.classes and sorted(listed.val.labels) == sorted(folder.val.labels)
    loaders = build_loaders(data_config(root, backend, format="filelist"), spec=CPU, seed=0)
    assert loaders.train.num_samples == 40 and loaders.val.num_samples == 20


def test_filelist_errors_name_the_file_and_line(tmp_path, tiny_imagefolder):
    root = tmp_path / "lists"
    write_filelist(root, tiny_imagefolder)
    (root / "val.txt").write_text("cool_disc/cool_disc_0000.jpg 3\nno-label-here\n")
    with pytest.raises(DataError, match=r"val.txt:2: expected 'relative/path label'"):
        load_dataset("filelist", root)
    (root / "val.txt").write_text("cool_disc/cool_disc_0000.jpg 99\n")
    with pytest.raises(DataError, match=r"val.txt:1: label 99 out of range for 10 classes"):
        load_dataset("filelist", root)
    (root / "val.txt").write_text("cool_disc/missing.jpg 1\n")
    with pytest.raises(DataError, match="val image not found: .*cool_disc/missing.jpg"):
        load_dataset("filelist", root)
    (root / "classes.txt").unlink()
    with pytest.raises(DataError, match="filelist layout needs a class-name file: .*classes.txt not found"):
        load_dataset("filelist", root)


@pytest.fixture(scope="module")
def cifar_like(tmp_path_factory, tiny_imagefolder) -> Path:
    """The CIFAR-10-images checkout's shape: train/<class>/ and test/<class>/, no val/."""
    root = tmp_path_factory.mktemp("cifar-like")
    shutil.copytree(tiny_imagefolder / "train", root / "train")
    shutil.copytree(tiny_imagefolder / "val", root / "test")
    return root


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_imagefolder_reads_a_validation_folder_named_by_data_val_dir(backend, cifar_like, tiny_imagefolder):
    require_backend(backend)
    named = load_dataset("imagefolder", cifar_like, val_dir="test")
    usual = load_dataset("imagefolder", tiny_imagefolder)
    assert named.classes == usual.classes and named.val.labels == usual.val.labels
    assert [Path(f).relative_to(cifar_like / "test") for f in named.val.files] == [
        Path(f).relative_to(tiny_imagefolder / "val") for f in usual.val.files]
    loaders = build_loaders(data_config(cifar_like, backend, val_dir="test"), spec=CPU, seed=0)
    seen = sum(batch.size for batch in loaders.val)
    assert seen == len(usual.val)


def test_a_missing_validation_folder_is_one_line_naming_data_val_dir(cifar_like, tmp_path, capsys):
    with pytest.raises(DataError) as info:
        load_dataset("imagefolder", cifar_like)
    assert str(info.value) == (f"data.val_dir: imagefolder layout needs val/ with one folder per class under "
                               f"data.root: {cifar_like / 'val'} not found; {cifar_like} has test/: set "
                               f"data.val_dir=test")
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", str(_tiny_yaml(tmp_path, cifar_like, out)), "data.val_dir=held-out"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastkd: error: data.val_dir: ") and "held-out/" in err[0]
    assert not out.exists()  # a refused run writes nothing


def _tiny_yaml(tmp_path: Path, root: Path, out: Path) -> Path:
    import yaml

    from tests.conftest import tiny_config_dict

    path = tmp_path / "cifar.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(root, out)))
    return path


@pytest.mark.parametrize("value, message", [
    ("../elsewhere", "data.val_dir: must be a folder name under data.root, got '../elsewhere'"),
    ("train", "data.val_dir: must differ from data.train_dir (both 'train'): validating on training images"),
])
def test_data_val_dir_must_be_another_folder_under_the_root(value, message, tmp_path):
    from fastkd.config import load_config
    from fastkd.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config(_tiny_yaml(tmp_path, tmp_path, tmp_path / "runs"), [f"data.val_dir={value}"])
    assert str(info.value) == message
