"""benchmarks/cifar10.py: the original scripts' patches and the reading of their logs."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO


def load_script():
    spec = importlib.util.spec_from_file_location("cifar10_table", REPO / "benchmarks" / "cifar10.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_the_table_recipe_is_read_from_the_cifar10_configs():
    table = load_script()
    recipe = table.read_recipe()
    assert (recipe.teacher, recipe.student, recipe.image_size, recipe.val_resize) == (
        "resnet18", "shufflenet_v2_x0_5", 32, 32)
    assert (recipe.lr, recipe.weight_decay, recipe.batch_size, recipe.warmup_epochs) == (0.1, 1e-4, 64, 1)
    assert (recipe.temperature, recipe.kd_weight, recipe.crop_scale) == (3.0, 0.6, (0.35, 1.0))


def _once(crops: str) -> str:
    """kd.py holds each crop line once; main.py twice (once in a commented-out block)."""
    return "".join(dict.fromkeys(crops.splitlines(keepends=True)))


def _fake_original(folder: Path) -> Path:
    """Files with the lines the patches touch (not the original's code)."""
    folder.mkdir()
    crops = ("transforms.RandomResizedCrop(224),\ntransforms.RandomResizedCrop(224),\n"
             "transforms.Resize(256),\ntransforms.Resize(256),\ntransforms.CenterCrop(224),\n"
             "transforms.CenterCrop(224),\n")
    (folder / "main.py").write_text(crops + "m(num_classes=100)\nm(num_classes=100, pretrained=True)\n")
    (folder / "kd.py").write_text(_once(crops) + "m(num_classes=100)\nm(num_classes=100, pretrained=True)\n"
                                  "b(num_classes=100)\n    big_model = nn.DataParallel(big_model).cuda()\n")
    (folder / "my_dataset.py").write_text("import os\nimport cv2\n")
    (folder / "loss.py").write_text("")
    return folder


def test_patches_apply_exactly_and_a_changed_checkout_is_refused(tmp_path):
    table = load_script()
    recipe = table.read_recipe()
    code = table.prepare_original(_fake_original(tmp_path / "orig"), tmp_path / "out", recipe)
    kd = (code / "kd.py").read_text()
    assert "RandomResizedCrop(32, scale=(0.35, 1))," in kd and "Resize(32)" in kd and "CenterCrop(32)" in kd
    assert "num_classes=100" not in kd and kd.count("num_classes=10") == 3 and "DataParallel" not in kd
    assert (code / "my_dataset.py").read_text() == "import os\n"
    other = _fake_original(tmp_path / "other")
    (other / "kd.py").write_text((other / "kd.py").read_text().replace("CenterCrop(224)", "CenterCrop(192)", 1))
    with pytest.raises(SystemExit, match=r"kd.py holds 'transforms.CenterCrop\(224\),' 0 time\(s\), expected 1"):
        table.prepare_original(other, tmp_path / "out2", recipe)
    assert not (tmp_path / "out2").exists()


def test_original_csv_layout_links_the_same_files_with_the_same_labels(tmp_path, tiny_imagefolder):
    import csv

    from pipelines.datasets import load_dataset

    table = load_script()
    data = table.prepare_original_data(tiny_imagefolder, "val", tmp_path / "layout")
    dataset = load_dataset("imagefolder", tiny_imagefolder)
    classes = json.loads((data / "classes_name.json").read_text())
    assert [classes[c][0] for c in dataset.classes] == list(range(len(dataset.classes)))
    for split, name in ((dataset.train, "new_train.csv"), (dataset.val, "new_val.csv")):
        rows = list(csv.reader((data / name).open()))[1:]
        assert [(data / "images" / r[1]).resolve() for r in rows] == [Path(f).resolve() for f in split.files]
        assert [classes[r[2]][0] for r in rows] == list(split.labels)


def test_an_original_runs_log_becomes_a_fastkd_summary(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    table = load_script()
    writer = SummaryWriter(tmp_path / "tb")  # as the original scripts write theirs
    train_top1, val_top1 = [30.0, 50.0, 60.0], [35.0, 55.0, 52.0]
    for epoch in range(3):
        time.sleep(0.05)
        writer.add_scalar("train/loss", 2.0 - epoch / 2, epoch)
        writer.add_scalar("train/accuracy", train_top1[epoch], epoch)
        writer.add_scalar("lr", 0.1, epoch)
        writer.add_scalar("val/loss", 1.5, epoch)
        writer.add_scalar("val/accuracy", val_top1[epoch], epoch)
    writer.close()
    summary, records = table.original_run_summary(tmp_path / "tb", name="original-student-s0", model="m",
                                                  num_train=1000, wall_seconds=9.0, device="CPU")
    assert (summary["best_val_top1"], summary["best_epoch"], summary["final_val_top1"]) == (55.0, 2, 52.0)
    assert summary["train_val_gap"] == 8.0 and summary["process_seconds"] == 9.0 and summary["kind"] == "train"
    assert [r["epoch"] for r in records] == [1, 2, 3] and [r["train_top1"] for r in records] == train_top1
    # each epoch's training time runs from the previous validation's scalars to its own: the sleeps
    assert summary["train_seconds"] <= summary["wall_seconds"] < 2
    assert 0.14 <= summary["train_seconds"] < 2 and summary["images_per_sec"] == pytest.approx(
        3000 / summary["train_seconds"], rel=0.05)


def _args(table, tmp_path, *extra):
    (tmp_path / "data" / "train").mkdir(parents=True, exist_ok=True)
    (tmp_path / "data" / "test").mkdir(exist_ok=True)
    return table.build_args(["--original", str(tmp_path / "orig"), "--data", str(tmp_path / "data"),
                             "--out", str(tmp_path / "out"), *extra])


def test_each_role_runs_its_script_with_the_recipe_of_the_configs(tmp_path):
    table = load_script()
    recipe = table.read_recipe()
    for role, script, arch, name in (("teacher", "main.py", "resnet18", "resnet18"),
                                     ("student", "main.py", "shufflenet_v2_x0_5", "shufflenet_v2_x0_5"),
                                     ("kd", "kd.py", "shufflenet_v2_x0_5", "kd")):
        args = _args(table, tmp_path, "--role", role, "--seed", "2", "--workers", "3")
        command, tb_name, model = table.original_command(args, recipe, tmp_path / "code", tmp_path / "csv")
        assert command[1:3] == [str(tmp_path / "code" / script), str(tmp_path / "csv")]
        flags = dict(zip(command[3::2], command[4::2]))
        assert (flags["-a"], flags["--epochs"], flags["-b"], flags["--lr"], flags["--seed"], flags["-j"]) == (
            arch, "7", "64", "0.1", "2", "3")
        assert (tb_name, model) == (name, arch)
        assert (flags.get("--big"), flags.get("--T"), flags.get("--alpha")) == (
            ("resnet18", "3.0", "0.6") if role == "kd" else (None, None, None))


def test_kd_without_that_seeds_teacher_is_refused_before_anything_is_written(tmp_path):
    """kd.py goes on with a random teacher when it finds none: the adapter refuses first."""
    table = load_script()
    _fake_original(tmp_path / "orig")
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "test").mkdir()
    argv = ["--original", str(tmp_path / "orig"), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
            "--role", "kd", "--seed", "1"]
    with pytest.raises(SystemExit, match=r"--role kd: .*seed1/runs/resnet18/model_best.pth.tar not found: run "
                                         r"--role teacher --seed 1 first"):
        table.main(argv)
    assert not (tmp_path / "out").exists()


def test_a_finished_run_is_not_run_again(tmp_path):
    table = load_script()
    _fake_original(tmp_path / "orig")
    done = tmp_path / "out" / "runs" / "original-student-s0"
    done.mkdir(parents=True)
    (done / "summary.json").write_text("{}")
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "test").mkdir()
    with pytest.raises(SystemExit, match="original-student-s0: finished before"):
        table.main(["--original", str(tmp_path / "orig"), "--data", str(tmp_path / "data"), "--out",
                    str(tmp_path / "out"), "--role", "student", "--seed", "0"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["runs"]
