"""The mini-ImageNet configs carry the original project's recipe, and the docs its results.

The expectations below are copied from the original project's published tables (100 epochs,
batch 64, SGD lr 0.1 momentum 0.9 weight decay 1e-4, 224 px, cosine with one warm-up epoch
unless a row says otherwise), not from the configs they check.
"""

from __future__ import annotations

import re

import pytest

from fastkd.config import load_config
from tests.conftest import REPO

CONFIGS = REPO / "configs" / "mini_imagenet"

# name: (student, teacher, schedule, warm-up epochs, T, alpha, original val top-1)
ORIGINAL = {
    "tricks_step_lr": ("shufflenet_v2_x1_0", None, "step", 0, None, None, 76.71),
    "tricks_cosine": ("shufflenet_v2_x1_0", None, "cosine", 0, None, None, 77.72),
    "tricks_cosine_warmup1": ("shufflenet_v2_x1_0", None, "cosine", 1, None, None, 78.84),
    "tricks_cosine_warmup3": ("shufflenet_v2_x1_0", None, "cosine", 3, None, None, 77.76),
    "shufflenet_v2_x1_0": ("shufflenet_v2_x1_0", None, "cosine", 1, None, None, 78.84),
    "shufflenet_v2_x1_5": ("shufflenet_v2_x1_5", None, "cosine", 1, None, None, 79.1),
    "shufflenet_v2_x2_0": ("shufflenet_v2_x2_0", None, "cosine", 1, None, None, 80.83),
    "resnet18": ("resnet18", None, "cosine", 1, None, None, 79.11),
    "resnet34": ("resnet34", None, "cosine", 1, None, None, 81.0),
    "resnet50": ("resnet50", None, "cosine", 1, None, None, 81.79),
    "kd_shufflenet_x2_0_to_x1_0_T1_alpha0.9": ("shufflenet_v2_x1_0", "shufflenet_v2_x2_0", "cosine", 1, 1, 0.9, 79.64),
    "kd_shufflenet_x2_0_to_x1_0_T3_alpha0.9": ("shufflenet_v2_x1_0", "shufflenet_v2_x2_0", "cosine", 1, 3, 0.9, 81.10),
    "kd_shufflenet_x2_0_to_x1_0_T5_alpha0.9": ("shufflenet_v2_x1_0", "shufflenet_v2_x2_0", "cosine", 1, 5, 0.9, 80.65),
    "kd_shufflenet_x2_0_to_x1_0_T10_alpha0.9": ("shufflenet_v2_x1_0", "shufflenet_v2_x2_0", "cosine", 1, 10, 0.9,
                                                80.875),
    "kd_shufflenet_x2_0_to_x1_0_T3_alpha0.7": ("shufflenet_v2_x1_0", "shufflenet_v2_x2_0", "cosine", 1, 3, 0.7, 81.27),
    "kd_shufflenet_x2_0_to_x1_0_T3_alpha0.6": ("shufflenet_v2_x1_0", "shufflenet_v2_x2_0", "cosine", 1, 3, 0.6, 81.28),
    "kd_shufflenet_x2_0_to_x1_0_T3_alpha0.5": ("shufflenet_v2_x1_0", "shufflenet_v2_x2_0", "cosine", 1, 3, 0.5, 80.78),
    "kd_resnet50_to_resnet18_T3_alpha0.6": ("resnet18", "resnet50", "cosine", 1, 3, 0.6, 82.45),
}
EXTRA = {"shufflenet_v2_x0_5", "fast_kd_resnet50_to_resnet18"}  # fastkd's own: not in the original's tables


def test_every_original_result_has_a_config_and_nothing_else_is_there():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(ORIGINAL) | EXTRA


@pytest.mark.parametrize("name", sorted(ORIGINAL))
def test_config_carries_the_original_recipe(name):
    student, teacher, schedule, warmup, temperature, alpha, _ = ORIGINAL[name]
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert (cfg.model.arch, cfg.optim.schedule, cfg.optim.warmup_epochs) == (student, schedule, warmup)
    assert (cfg.optim.epochs, cfg.data.batch_size, cfg.data.image_size, cfg.data.val_resize) == (100, 64, 224, 256)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.1, 0.9, 1e-4)
    assert not cfg.optim.nesterov and cfg.optim.label_smoothing == 0 and cfg.data.format == "mini-imagenet"
    if schedule == "step":
        assert (cfg.optim.step_epochs, cfg.optim.gamma) == (30, 0.1)
    else:
        assert cfg.optim.min_lr_ratio == 1e-4
    if teacher is None:
        assert cfg.distill is None
    else:
        kd = cfg.distill
        assert kd is not None and kd.teacher.arch == teacher and kd.loss == "kd"
        assert (kd.temperature, kd.kd_weight, kd.ce_weight) == pytest.approx((temperature, alpha, 1 - alpha))
        assert kd.teacher.checkpoint == f"runs/mini_imagenet/{teacher}/best.pt"


def test_the_docs_list_every_config_with_its_original_top1():
    page = (REPO / "docs" / "original-project.md").read_text()
    for name, expected in ORIGINAL.items():
        row = re.search(rf"^\| `{re.escape(name)}` \| ([0-9.]+) \|", page, re.M)
        assert row, f"docs/original-project.md has no results row for {name}"
        assert float(row.group(1)) == pytest.approx(expected[-1]), name


def test_the_fast_recipe_keeps_the_original_kd_and_changes_only_time_to_accuracy():
    """Same student, teacher, T, alpha and optimizer as the original's ResNet-50 -> ResNet-18;
    fewer epochs, a cached teacher at 224 px, a student ramped 160 -> 192 px, tested at 256 px."""
    original = load_config(CONFIGS / "kd_resnet50_to_resnet18_T3_alpha0.6.yaml")
    fast = load_config(CONFIGS / "fast_kd_resnet50_to_resnet18.yaml")
    assert fast.model == original.model and fast.distill.teacher.arch == original.distill.teacher.arch
    assert (fast.distill.temperature, fast.distill.kd_weight) == (original.distill.temperature, original.distill.kd_weight)
    assert (fast.optim.name, fast.optim.lr, fast.optim.weight_decay) == (original.optim.name, original.optim.lr,
                                                                         original.optim.weight_decay)
    assert fast.optim.epochs < original.optim.epochs and fast.distill.teacher_cache
    from fastkd.data import size_schedule

    sizes = [size_schedule(fast.data).at(epoch) for epoch in range(fast.optim.epochs)]
    assert sizes[0] == 160 and sizes[-1] == 192 and sorted(sizes) == sizes
    assert fast.distill.teacher.image_size == 224 and fast.data.val_crop_size == 256
