"""Optimizer construction and the learning-rate schedule, a pure function of the step."""

from __future__ import annotations

import math

import torch
from torch import nn

from fastkd.config import OptimConfig
from fastkd.errors import ConfigError


def param_groups(model: nn.Module, weight_decay: float, exempt_norm_bias: bool) -> list[dict]:
    """One group, or two when normalization weights and biases (all 1-D tensors) skip decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not exempt_norm_bias:
        return [{"params": params, "weight_decay": weight_decay}]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def create_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device,
                     fused: bool | None = None) -> torch.optim.Optimizer:
    """The configured optimizer; torch's fused kernels on a GPU (`fused`: None = on CUDA only).

    Fused optimizers take the GradScaler's scale and inf flag on the device, so an fp16 step
    needs no host sync (apex's do not: see `_create_apex_optimizer`).
    """
    groups = param_groups(model, cfg.weight_decay, cfg.no_weight_decay_norm_bias)
    if cfg.implementation == "apex":
        return _create_apex_optimizer(groups, cfg)
    fused = (device.type == "cuda") if fused is None else fused
    if cfg.name == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                    fused=fused or None)
        if fused and cfg.momentum:
            _zero_momentum_buffers(optimizer)
        return optimizer
    optimizer_class = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return optimizer_class(groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None)


def _zero_momentum_buffers(optimizer: torch.optim.SGD) -> None:
    """Start fused SGD with zero momentum buffers instead of letting its first step create them.

    Fused SGD allocates the buffers uninitialized on its first step and fills them in its
    kernel, which an fp16 step skipped by the GradScaler (inf gradients, common at the start
    of training) never runs: the garbage then enters every later update as NaN losses. With
    zero buffers the first real update, `buf = momentum * 0 + grad`, is the one SGD defines
    (no dampening).
    """
    for group in optimizer.param_groups:
        for param in group["params"]:
            optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def _create_apex_optimizer(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """NVIDIA apex's fused optimizers. With fp16 the GradScaler reads their inf flag on the host
    every step (apex optimizers do not take it on the device): one host sync per step."""
    try:
        from apex.optimizers import FusedAdam, FusedSGD  # NVIDIA apex, built from source by the user
    except ImportError:
        raise ConfigError("optim.implementation: apex requested but NVIDIA apex is not installed "
                          "(build it from github.com/NVIDIA/apex; the PyPI package named 'apex' is "
                          "unrelated); use torch") from None
    if cfg.name == "sgd":
        return FusedSGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return FusedAdam(groups, lr=cfg.lr, betas=cfg.betas, adam_w_mode=cfg.name == "adamw")


def lr_at(step: int, cfg: OptimConfig, steps_per_epoch: int) -> float:
    """Learning rate for optimizer step `step` (0-based).

    Warm-up (per iteration, as the original project): the factor rises linearly from
    `warmup_start_factor` at step 0 to 1 at step `warmup_steps`. Then:
    - cosine: `min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * t / T)) / 2`, with t the
      steps since warm-up and T the steps from the end of warm-up to the end of training;
    - step: `gamma ** (epoch // step_epochs)`; multistep: `gamma ** (milestones passed)`,
      where `epoch` is the (fractional) epoch of the step;
    - constant: 1.
    """
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup_steps:
        alpha = step / warmup_steps
        return cfg.lr * (cfg.warmup_start_factor * (1 - alpha) + alpha)
    epoch = step / steps_per_epoch
    if cfg.schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        factor = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * (1 + math.cos(math.pi * min(progress, 1.0))) / 2
    elif cfg.schedule == "step":
        factor = cfg.gamma ** int(epoch // cfg.step_epochs)
    elif cfg.schedule == "multistep":
        factor = cfg.gamma ** sum(epoch >= m for m in cfg.milestones_epochs)
    else:
        factor = 1.0
    return cfg.lr * factor


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every parameter the optimizer updates (what gradient clipping sees)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
