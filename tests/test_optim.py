from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastkd.config import OptimConfig
from fastkd.errors import ConfigError
from fastkd.optim import create_optimizer, lr_at, param_groups

STEPS = 100  # steps per epoch


def seed_cosine_factor(step: int, steps_per_epoch: int, epochs: int, warmup_epochs: int, lrf: float,
                       warmup_factor: float = 1e-3) -> float:
    """The original project's per-iteration schedule, written out independently."""
    warmup = warmup_epochs * steps_per_epoch
    if warmup_epochs and step <= warmup:
        alpha = step / warmup
        return warmup_factor * (1 - alpha) + alpha
    current = step - warmup
    total = (epochs - warmup_epochs) * steps_per_epoch
    return ((1 + math.cos(current * math.pi / total)) / 2) * (1 - lrf) + lrf


@pytest.mark.parametrize("warmup_epochs", [0, 1, 3])
def test_cosine_with_warmup_matches_the_original_formula(warmup_epochs):
    cfg = OptimConfig(lr=0.1, epochs=10, schedule="cosine", warmup_epochs=warmup_epochs, min_lr_ratio=1e-4)
    for step in [0, 1, 50, warmup_epochs * STEPS - 1, warmup_epochs * STEPS, warmup_epochs * STEPS + 1,
                 500, 999]:
        if step < 0:
            continue
        expected = 0.1 * seed_cosine_factor(step, STEPS, 10, warmup_epochs, 1e-4)
        assert lr_at(step, cfg, STEPS) == pytest.approx(expected, rel=1e-9, abs=1e-12), step


def test_warmup_starts_small_peaks_at_lr_and_cosine_ends_at_min_ratio():
    cfg = OptimConfig(lr=0.2, epochs=5, warmup_epochs=1, min_lr_ratio=0.01)
    assert lr_at(0, cfg, STEPS) == pytest.approx(0.2 * 1e-3)
    assert lr_at(STEPS, cfg, STEPS) == pytest.approx(0.2)
    assert lr_at(5 * STEPS, cfg, STEPS) == pytest.approx(0.2 * 0.01)
    lrs = [lr_at(s, cfg, STEPS) for s in range(5 * STEPS)]
    assert max(lrs) == pytest.approx(0.2)
    assert all(a <= b for a, b in zip(lrs[:STEPS], lrs[1:STEPS + 1]))  # rising during warm-up
    assert all(a >= b for a, b in zip(lrs[STEPS:], lrs[STEPS + 1:]))  # falling after


def test_step_and_multistep_decay_at_epoch_boundaries():
    step_cfg = OptimConfig(lr=0.1, epochs=90, schedule="step", step_epochs=30, gamma=0.1)
    assert lr_at(30 * STEPS - 1, step_cfg, STEPS) == pytest.approx(0.1)
    assert lr_at(30 * STEPS, step_cfg, STEPS) == pytest.approx(0.01)
    assert lr_at(60 * STEPS, step_cfg, STEPS) == pytest.approx(0.001)
    multi = OptimConfig(lr=0.1, epochs=90, schedule="multistep", milestones_epochs=(10, 50), gamma=0.5)
    assert [lr_at(e * STEPS, multi, STEPS) for e in (0, 9, 10, 49, 50, 89)] == \
        pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    constant = OptimConfig(lr=0.3, epochs=3, schedule="constant")
    assert {lr_at(s, constant, STEPS) for s in range(300)} == {0.3}


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)


def test_norm_and_bias_parameters_are_exempt_from_weight_decay_when_asked():
    model = Small()
    groups = param_groups(model, 0.1, exempt_norm_bias=True)
    decayed = {id(p) for p in groups[0]["params"]}
    exempt = {id(p) for p in groups[1]["params"]}
    assert decayed == {id(model.conv.weight), id(model.fc.weight)}
    assert exempt == {id(model.conv.bias), id(model.bn.weight), id(model.bn.bias), id(model.fc.bias)}
    assert groups[1]["weight_decay"] == 0.0

    # One SGD step with zero gradients: only weight decay moves parameters.
    optimizer = create_optimizer(model, OptimConfig(lr=1.0, momentum=0.0, weight_decay=0.1,
                                                    no_weight_decay_norm_bias=True), torch.device("cpu"))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        moved = not torch.equal(before[name], p.detach())
        assert moved == (name in ("conv.weight", "fc.weight")), name


def test_without_the_option_everything_decays():
    groups = param_groups(Small(), 0.1, exempt_norm_bias=False)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.1


def test_apex_without_apex_installed_is_a_clear_error():
    try:
        import apex.optimizers  # noqa: F401
        pytest.skip("NVIDIA apex is installed")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match="optim.implementation: apex requested but NVIDIA apex is not installed"):
        create_optimizer(Small(), OptimConfig(implementation="apex"), torch.device("cpu"))


@pytest.mark.parametrize("nesterov", [False, True])
def test_fused_sgd_survives_skipped_first_fp16_steps_and_matches_plain_sgd(nesterov):
    """The GradScaler skips the first steps (inf gradients); fused SGD must not carry garbage
    momentum out of them (it allocates its buffers uninitialized on the first step)."""
    cfg = OptimConfig(lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=1e-4)
    losses = {}
    for fused in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        optimizer = create_optimizer(model, cfg, torch.device("cpu"), fused=fused)
        if fused:  # zero from the start, not whatever memory an uninitialized buffer held
            assert all(torch.equal(optimizer.state[p]["momentum_buffer"], torch.zeros_like(p))
                       for p in model.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        images, labels = torch.randn(8, 16), torch.randint(0, 4, (8,))
        losses[fused] = []
        for step in range(6):
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            (scaler.scale(loss) * (math.inf if step < 2 else 1.0)).backward()
            scaler.step(optimizer)
            scaler.update()
            losses[fused].append(loss.item())
    assert all(math.isfinite(x) for x in losses[True]) and losses[True][-1] < losses[True][0]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
