"""Step objects: the forward pass and the loss of one batch. The loop does the rest.

A step is an `nn.Module` so `step.train()` / `step.eval()` reach the student; the
distillation step keeps its teacher in eval mode whatever mode it is put in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fastkd.features import FeatureTaps
from fastkd.losses import feature_loss, hint_features
from pipelines.base import Batch, Mix


@dataclass
class StepOutput:
    loss: torch.Tensor
    """Scalar fp32 loss that backward() sees."""
    logits: torch.Tensor
    """Student logits of the batch."""
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    """Batch means worth logging: unweighted loss terms, student-teacher agreement."""


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mix: Mix | None, label_smoothing: float) -> torch.Tensor:
    """Batch-mean cross-entropy in fp32, label-smoothed; against soft targets with a `mix`:
    `weight * onehot(labels) + (1 - weight) * onehot(partner_labels)`, each smoothed, which
    (cross-entropy being linear in the target) is the weighted sum of the two hard-label terms
    (timm's `mixup_target` + `SoftTargetCrossEntropy`)."""
    logits = logits.float()
    if mix is None:
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    own = F.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction="none")
    partner = F.cross_entropy(logits, mix.partner_labels, label_smoothing=label_smoothing, reduction="none")
    return torch.lerp(partner, own, mix.weight).mean()


class Step(Protocol):
    """What the loop and the bench call a step: `ClassificationStep` or `DistillationStep`."""

    def __call__(self, batch: Batch) -> StepOutput: ...

    def set_epoch(self, epoch: int) -> None: ...

    def train(self, mode: bool = True) -> Any: ...


class ClassificationStep(nn.Module):
    """Supervised training: cross-entropy (optionally label-smoothed, soft-target for mixed
    batches) on the model's logits."""

    def __init__(self, model: nn.Module, *, autocast: Callable[[], ContextManager], label_smoothing: float = 0.0):
        super().__init__()
        self.model = model
        self.autocast = autocast
        self.label_smoothing = label_smoothing

    def set_epoch(self, epoch: int) -> None:
        pass

    def forward(self, batch: Batch) -> StepOutput:
        with self.autocast():
            logits = self.model(batch.images)
        loss = cross_entropy(logits, batch.labels, batch.mix, self.label_smoothing)
        return StepOutput(loss=loss, logits=logits, parts={"ce": loss.detach()})


def frozen_forward(teacher: nn.Module, images: torch.Tensor, *, autocast: Callable[[], ContextManager],
                   input_dtype: torch.dtype | None = None) -> torch.Tensor:
    """A frozen model's logits, building no autograd graph, under its own autocast and input dtype.

    no_grad rather than inference_mode: the result feeds a loss that autograd saves.
    """
    if input_dtype is not None and images.dtype != input_dtype:
        images = images.to(input_dtype)  # keeps the memory format
    with torch.no_grad(), autocast():
        return teacher(images)


@dataclass
class TeacherOutputs:
    """What a distillation step takes from the teacher for one batch."""

    logits: torch.Tensor
    features: torch.Tensor | None = None
    """Its pooled pre-logit features (`distill.feature`), else None."""
    hint: torch.Tensor | None = None
    """Its hint layer's output (`distill.hint`), else None."""


class RecordedTeacher(Protocol):
    """Teacher outputs looked up instead of computed (`fastkd.teacher_cache.CachedTeacher`)."""

    def set_epoch(self, epoch: int) -> None: ...

    def __call__(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The logits and, when recorded and asked for, the pooled features of these samples (host
        int64 indices) in the current epoch, on the device."""


class DistillationStep(nn.Module):
    """Student and frozen teacher on the same augmented batch.

    `loss = ce_weight * CE(student, labels; label_smoothing) + kd_weight * term(student, teacher, labels)
    + feature_weight * MSE(projected student features, teacher features) + hint_weight * MSE(adapted
    student map, teacher map)`; the logit term is left out with `kd_weight` 0. The student is then
    `fastkd.features.StudentWithHeads` (its forward returns its logits, projected features and
    adapted map) and the live teacher's features come from `teacher_taps`. With `token` (a timm
    model with a distillation head, returning the class and distillation heads' logits in
    training) the cross-entropy takes the class head and the logit term the distillation head.

    With a side `stream` (a `torch.cuda.Stream`, on a GPU) the teacher's forward is queued on
    it before the student's forward is queued on the current stream, so the two overlap. Two
    waits make that safe, and both happen inside every step:
    - the side stream waits for the current stream before the teacher reads the batch (the
      batch's producer, e.g. DALI's copy into it, was queued on the current stream);
    - the current stream waits for the side stream before the loss reads the teacher's
      outputs. Everything queued later on the current stream, including whatever the caching
      allocator gives a batch tensor's memory to once this step drops it, therefore runs after
      the teacher's last read of the batch.
    DALI's own output buffers (its dynamic executor hands them over through DLPack; they are
    not PyTorch allocations, so `record_stream` does nothing for them) are protected by DALI:
    a released buffer waits in its deferred-deletion queue until all GPU work queued before
    the release has finished (a `cudaDeviceSynchronize` on a thread of DALI's) before DALI
    refills it. The teacher's outputs come from PyTorch's allocator on the side stream and are
    read on the current stream, so they are recorded there.

    Without a stream (CPU, or `distill.side_stream: false`) the same code runs the two
    forwards one after the other. The teacher stays in eval mode whatever mode the step is put
    in, has no gradients, and is never part of the optimizer or the checkpoint. Its input is
    cast to `teacher_input_dtype` when given (an fp32 teacher fed the fp16 batches of a
    reduced-precision run: no autocast would cast them).

    With `recorded` outputs (a teacher cache) there is no teacher at all: the logits (and
    features) of the batch's samples are looked up by index, and the step costs what the student
    alone costs.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, *, term: Callable, kd_weight: float,
                 ce_weight: float, autocast: Callable[[], ContextManager],
                 teacher_autocast: Callable[[], ContextManager], stream: "torch.cuda.Stream | None" = None,
                 teacher_input_dtype: torch.dtype | None = None, label_smoothing: float = 0.0,
                 recorded: RecordedTeacher | None = None, feature_weight: float = 0.0, hint_weight: float = 0.0,
                 teacher_taps: FeatureTaps | None = None, token: bool = False):
        super().__init__()
        if (teacher is None) == (recorded is None):
            raise ValueError("DistillationStep takes a teacher or recorded logits, exactly one of them")
        self.model = student
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None else None
        self.recorded = recorded
        self.term = term
        self.kd_weight = kd_weight
        self.ce_weight = ce_weight
        self.feature_weight = feature_weight
        self.hint_weight = hint_weight
        self.teacher_taps = teacher_taps
        self.token = token
        self.autocast = autocast
        self.teacher_autocast = teacher_autocast
        self.stream = stream
        self.teacher_input_dtype = teacher_input_dtype
        self.label_smoothing = label_smoothing

    def train(self, mode: bool = True) -> "DistillationStep":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def set_epoch(self, epoch: int) -> None:
        if self.recorded is not None:
            self.recorded.set_epoch(epoch)

    @property
    def has_heads(self) -> bool:
        """Whether the student is `StudentWithHeads` (feature or hint distillation)."""
        return self.feature_weight > 0 or self.hint_weight > 0

    def _teacher_forward(self, images: torch.Tensor) -> TeacherOutputs:
        assert self.teacher is not None, "a step with recorded logits runs no teacher"
        logits = frozen_forward(self.teacher, images, autocast=self.teacher_autocast,
                                input_dtype=self.teacher_input_dtype)
        features, hint = self.teacher_taps.take() if self.teacher_taps is not None else (None, None)
        return TeacherOutputs(logits, features, hint)

    def teacher_outputs(self, images: torch.Tensor, indices: torch.Tensor | None = None) -> TeacherOutputs:
        """The teacher's outputs; with a side stream, queued there (call `student_output` next)."""
        if self.recorded is not None:
            if indices is None:
                raise ValueError("recorded teacher logits need the batch's sample indices")
            logits, features = self.recorded(indices)
            return TeacherOutputs(logits, features)
        if self.stream is None:
            return self._teacher_forward(images)
        self.stream.wait_stream(torch.cuda.current_stream())  # the batch is ready
        with torch.cuda.stream(self.stream):
            return self._teacher_forward(images)

    def forward(self, batch: Batch) -> StepOutput:
        """The teacher sees `batch.teacher_view` (its own view of the crops, else the student's)."""
        teacher = self.teacher_outputs(batch.teacher_view, batch.indices)  # queued first: overlaps the student
        return self.student_output(batch, teacher)

    def student_output(self, batch: Batch, teacher: TeacherOutputs) -> StepOutput:
        """The student's forward and the loss against given teacher outputs."""
        labels = batch.labels
        with self.autocast():
            out = self.model(batch.images)
        features = hint = None
        if self.has_heads:
            logits, features, hint = out
        elif self.token and self.training:
            logits, distilled = out  # the class head, then the distillation head
        else:
            logits = out
        if self.stream is not None and self.recorded is None:
            main = torch.cuda.current_stream()
            main.wait_stream(self.stream)  # the teacher is done with the batch and its outputs are ready
            for tensor in (teacher.logits, teacher.features, teacher.hint):
                if tensor is not None:
                    tensor.record_stream(main)
        ce = cross_entropy(logits, labels, batch.mix, self.label_smoothing)
        loss = self.ce_weight * ce
        parts = {"ce": ce.detach()}
        if self.kd_weight > 0:
            term = self.term(distilled if self.token and self.training else logits, teacher.logits, labels)
            loss = loss + self.kd_weight * term
            parts["kd"] = term.detach()
        if self.feature_weight > 0:
            assert features is not None and teacher.features is not None, "feature distillation: pooled features"
            feature = feature_loss(features, teacher.features)
            loss = loss + self.feature_weight * feature
            parts["feature"] = feature.detach()
        if self.hint_weight > 0:
            assert hint is not None and teacher.hint is not None, "hint distillation: both feature maps"
            hinted = feature_loss(hint_features(hint, (teacher.hint.shape[-2], teacher.hint.shape[-1])), teacher.hint)
            loss = loss + self.hint_weight * hinted
            parts["hint"] = hinted.detach()
        parts["agree"] = (logits.detach().argmax(dim=1) == teacher.logits.argmax(dim=1)).float().mean()
        return StepOutput(loss=loss, logits=logits, parts=parts)
