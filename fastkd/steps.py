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


class DistillationStep(nn.Module):
    """Student and frozen teacher on the same augmented batch.

    `loss = ce_weight * CE(student, labels) + kd_weight * term(student, teacher, labels)`.

    On a GPU the teacher's forward is queued on its own CUDA stream before the student's, so
    the two overlap; the main stream waits for the side stream before the loss, and tensors
    that cross streams are recorded on the stream that uses them so the caching allocator does
    not hand their memory out early. On the CPU (or with `side_stream=False`) the same code
    runs the two forwards one after the other. The teacher stays in eval mode whatever mode the
    step is put in, has no gradients, and is never part of the optimizer or the checkpoint.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, *, term: Callable, kd_weight: float,
                 ce_weight: float, autocast: Callable[[], ContextManager],
                 teacher_autocast: Callable[[], ContextManager], side_stream: bool):
        super().__init__()
        self.model = student
        self.teacher = teacher.eval().requires_grad_(False)
        self.term = term
        self.kd_weight = kd_weight
        self.ce_weight = ce_weight
        self.autocast = autocast
        self.teacher_autocast = teacher_autocast
        device = next(teacher.parameters()).device
        self.stream = torch.cuda.Stream(device) if side_stream and device.type == "cuda" else None

    def train(self, mode: bool = True) -> "DistillationStep":
        super().train(mode)
        self.teacher.eval()
        return self

    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        # no_grad rather than inference_mode: the result feeds a loss that autograd saves.
        with torch.no_grad():
            if self.stream is None:
                with self.teacher_autocast():
                    return self.teacher(images)
            self.stream.wait_stream(torch.cuda.current_stream())  # the batch is ready
            with torch.cuda.stream(self.stream), self.teacher_autocast():
                logits = self.teacher(images)
            images.record_stream(self.stream)
            return logits

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        teacher_logits = self.teacher_logits(images)  # queued first: overlaps the student below
        return self.student_output(images, labels, teacher_logits)

    def student_output(self, images: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor) -> StepOutput:
        """The student's forward and the loss against given teacher logits."""
        with self.autocast():
            logits = self.model(images)
        if self.stream is not None:
            main = torch.cuda.current_stream()
            main.wait_stream(self.stream)
            teacher_logits.record_stream(main)
        ce = F.cross_entropy(logits.float(), labels)
        term = self.term(logits, teacher_logits, labels)
        loss = self.ce_weight * ce + self.kd_weight * term
        agree = (logits.detach().argmax(dim=1) == teacher_logits.argmax(dim=1)).float().mean()
        return StepOutput(loss=loss, logits=logits,
                          parts={"ce": ce.detach(), "kd": term.detach(), "agree": agree})
