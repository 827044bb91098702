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


def test_the_plan_interleaves_the_systems_and_routes_every_override(tmp_path):
    table = load_script()
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "test").mkdir()
    args = table.build_args(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--seeds", "0", "1",
                             "--override", "optim.epochs=2", "--override", "distill.allow_weak_teacher=true"])
    jobs = table.plan(args, table.read_recipe(), tmp_path / "code", tmp_path / "odata")
    names = [job.name for job in jobs]
    assert names[:3] == ["fastkd-teacher-s0", "original-teacher-s0", "fastkd-student-dali-s0"]
    assert names.index("fastkd-teacher-s1") > names.index("fastkd-kd-cached-dali-s0")  # seed after seed
    for job in jobs:
        if job.original is None:
            assert "optim.epochs=2" in job.command, job.name  # every fastkd run gets the recipe change
            distills = job.command[3] in ("distill", "teacher-cache")
            assert ("distill.allow_weak_teacher=true" in job.command) == distills, job.name
    kd = next(job for job in jobs if job.name == "original-kd-s0")
    assert kd.needs == tmp_path / "out" / "original" / "seed0" / "runs" / "resnet18" / "model_best.pth.tar"


def test_plan_with_only_prints_those_rows_alone(tmp_path, capsys):
    table = load_script()
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "test").mkdir()
    table.main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--seeds", "0", "1",
                "--only", "fastkd student torchvision", "--plan"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0].split("] ")[1] for line in lines] == [
        "fastkd-student-torchvision-s0", "fastkd-student-torchvision-s1"], lines


def test_the_mixup_rows_are_tabulated_apart_from_the_recipes_seed_noise():
    """Rendered from the committed 2026-12-03 table's rows: a mixed row shows no train-val gap
    (a mixed image's hard label is not its target), its comparisons are drawn, and the pooled
    seed noise and the whole-table wall leave the mixup rows (another recipe) out."""
    table = load_script()
    saved = json.loads((REPO / "benchmarks/results/cifar10/2026-12-03-2core-amd-epyc/table.json").read_text())
    table.ROWS.update(table.MIX_ROWS)
    text, result = table.render(saved["rows"], table.read_recipe(), saved["env"])
    live = next(line for line in text.splitlines() if "with mixup (--mixup), live teacher" in line)
    cells = [c.strip() for c in live.strip("|").split("|")]
    assert cells[3].startswith("48.15") and cells[5] == ""
    plain = next(line for line in text.splitlines() if "| x0.5 distilled, live teacher" in line)
    assert [c.strip() for c in plain.strip("|").split("|")][5] != ""
    assert result["comparisons"]["mixup - plain KD, live teacher"]["difference"] == pytest.approx(-6.06, abs=0.01)
    assert result["noise"]["pooled_sd"] == pytest.approx(2.13, abs=0.01)
    assert "over 12 rows (the mixup rows, another recipe, left out)" in text
    without = {k: r for k, r in saved["rows"].items() if k not in table.MIX_ROWS}
    assert len(without) == len(saved["rows"]) - 3
    _, unmixed = table.render(without, table.read_recipe(), saved["env"])
    assert result["wall"]["fastkd_whole_table_seconds"] == unmixed["wall"]["fastkd_whole_table_seconds"]
    assert result["noise"] == unmixed["noise"]
