"""An exponential moving average of the student's weights (timm's ModelEmaV3 semantics).

After every optimizer step `k` (1-based), each floating-point parameter and buffer of the EMA
copy moves towards the model's: `ema = decay_k * ema + (1 - decay_k) * model`; integer buffers
(BatchNorm's batch counter) are copied. With warm-up, `decay_k = min(decay, 1 - (1 + k)^(-2/3))`
(timm's `warmup_power` 2/3, `warmup_gamma` 1), so the average follows the fast-changing early
weights and slows down to `decay`; without it, `decay_k = decay` from the first step.

The update is one fused multi-tensor lerp (and one multi-tensor copy of the integer buffers)
on the device with a Python float weight: no host sync (torch's `_foreach` kernels, as
torch.optim's and timm's EMA use). Under torchrun every rank keeps its own copy of its own (identical, all-reduced) weights,
as it keeps the model; rank 0's is saved, as the model is.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

WARMUP_POWER = 2 / 3


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """The decay of the update after optimizer step `step` (1-based)."""
    if not warmup:
        return decay
    return min(decay, 1 - (1 + step) ** -WARMUP_POWER)


class ModelEma:
    """The EMA copy of a model: `update` after each optimizer step, `module` to evaluate it."""

    def __init__(self, model: nn.Module, *, decay: float, warmup: bool = True):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self._pairs = self._tensor_pairs(model)

    def _tensor_pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor],
                                                       list[torch.Tensor]]:
        mine = self.module.state_dict(keep_vars=True)
        theirs = model.state_dict(keep_vars=True)
        floats = [k for k, v in mine.items() if v.is_floating_point()]
        others = [k for k in mine if k not in floats]
        return ([mine[k].data for k in floats], [theirs[k].data for k in floats],
                [mine[k].data for k in others], [theirs[k].data for k in others])

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move towards the model's current weights after optimizer step `step` (1-based)."""
        ema_floats, model_floats, ema_others, model_others = self._pairs
        weight = 1.0 - ema_decay_at(step, self.decay, self.warmup)
        torch._foreach_lerp_(ema_floats, model_floats, weight)
        if ema_others:
            torch._foreach_copy_(ema_others, model_others)

    def state_dict(self) -> dict[str, Any]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state, strict=True)


class NoEma:
    """EMA off: the same calls, doing nothing (the loop never branches on it)."""

    module = None

    def update(self, step: int) -> None:
        pass
