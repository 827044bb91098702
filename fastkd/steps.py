"""Step objects: the forward pass and the loss of one batch. The loop does the rest.

A step is an `nn.Module` so `step.train()` / `step.eval()` reach the student; the
distillation step keeps its teacher in eval mode whatever mode it is put in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class StepOutput:
    loss: torch.Tensor
    """Scalar fp32 loss that backward() sees."""
    logits: torch.Tensor
    """Student logits of the batch."""
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    """Batch means worth logging: unweighted loss terms, student-teacher agreement."""


class ClassificationStep(nn.Module):
    """Supervised training: cross-entropy (optionally label-smoothed) on the model's logits."""

    def __init__(self, model: nn.Module, *, autocast: Callable[[], ContextManager], label_smoothing: float = 0.0):
        super().__init__()
        self.model = model
        self.autocast = autocast
        self.label_smoothing = label_smoothing

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        with self.autocast():
            logits = self.model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        return StepOutput(loss=loss, logits=logits, parts={"ce": loss.detach()})
