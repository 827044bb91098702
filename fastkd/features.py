"""What feature distillation reads from the models, and the student's trainable adapters.

A model's pooled pre-logit features are the input of its final classifier (timm's
`forward_head(pre_logits=True)`; for a torchvision ResNet, the flattened average pool), and a
hint is the output of a named module: `FeatureTaps` captures both with hooks during the model's
own forward, so any model of any family serves, compiled or wrapped for DDP. The student's
adapters (`DistillationHeads`: a Linear from its pooled width to the teacher's when they differ,
a 1x1 convolution from its hint layer's channels to the teacher's) train with it
(`StudentWithHeads` is the one module DDP wraps), are saved in its checkpoints and left out of
the exported student.
"""

from __future__ import annotations

import difflib

import torch
from torch import nn

from fastkd.errors import ConfigError
from fastkd.models import classifier


def pooled_width(model: nn.Module, key: str) -> int:
    """The width of a model's pooled pre-logit features: its final Linear classifier's input."""
    head = classifier(model)
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"{key}: the model's classifier is a {type(head).__name__}, not a Linear layer: it has no "
                          "pooled pre-logit features to distil (remove distill.feature, or use another model)")
    return head.in_features


def named_module(model: nn.Module, name: str, key: str) -> nn.Module:
    """The module called `name` in `model.named_modules()`; an unknown name is one line listing the candidates."""
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    candidates = [n for n in modules if n and n.count(".") <= 1]
    close = difflib.get_close_matches(name, list(modules), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ConfigError(f"{key}: {name!r} is not a module of the model{hint}; its modules: {', '.join(candidates)}")


def probe_channels(model: nn.Module, layer: str, image_size: int, key: str) -> int:
    """The channels of `layer`'s output, from one forward of an empty image in eval mode (no
    running statistics move); one line when the layer's output is not a `[B, C, H, W]` map."""
    module = named_module(model, layer, key)
    shapes: list[torch.Size] = []
    handle = module.register_forward_hook(lambda m, args, out: shapes.append(out.shape))
    training = model.training
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model.eval()
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        handle.remove()
        model.train(training)
    if len(shapes[0]) != 4:
        raise ConfigError(f"{key}: {layer}'s output is {list(shapes[0])}, not a [batch, channels, height, width] map")
    return int(shapes[0][1])


class FeatureTaps:
    """The pooled pre-logit features (`pooled`) and a named module's output (`layer`) of a model's
    last forward, captured by hooks. `take()` hands them over once, so that features of an earlier
    batch are never read again."""

    def __init__(self, model: nn.Module, *, pooled: bool, layer: str | None, model_key: str, layer_key: str):
        self._pooled: torch.Tensor | None = None
        self._layer: torch.Tensor | None = None
        self.wants_pooled, self.wants_layer = pooled, layer is not None
        if pooled:
            pooled_width(model, model_key)  # a Linear classifier, or one line saying why not
            classifier(model).register_forward_pre_hook(self._take_pooled)
        if layer is not None:
            named_module(model, layer, layer_key).register_forward_hook(self._take_layer)

    def _take_pooled(self, module: nn.Module, args: tuple) -> None:
        self._pooled = args[0]

    def _take_layer(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._layer = output

    def take(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(pooled features, layer output) of the last forward, each None where not asked for."""
        pooled, layer = self._pooled, self._layer
        if (self.wants_pooled and pooled is None) or (self.wants_layer and layer is None):
            raise RuntimeError("feature taps: the model's forward did not reach the tapped modules")
        self._pooled = self._layer = None
        return pooled, layer


class DistillationHeads(nn.Module):
    """The student's trainable adapters to the teacher's features: `projection` (Linear, or
    Identity when the pooled widths agree) and `adapter` (1x1 convolution), each present when its
    term is on."""

    def __init__(self, *, projection: nn.Module | None = None, adapter: nn.Module | None = None):
        super().__init__()
        self.projection = projection
        self.adapter = adapter


def build_heads(student_width: int | None, teacher_width: int | None, student_channels: int | None,
                teacher_channels: int | None) -> DistillationHeads:
    """Adapters from the student's widths to the teacher's: a Linear for the pooled features when
    their widths differ (timm's FeatureDistillationTask), a 1x1 convolution for the hint (FitNets)."""
    projection = None
    if student_width is not None and teacher_width is not None:
        projection = nn.Identity() if student_width == teacher_width else nn.Linear(student_width, teacher_width)
    adapter = None
    if student_channels is not None and teacher_channels is not None:
        adapter = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)
    return DistillationHeads(projection=projection, adapter=adapter)


class StudentWithHeads(nn.Module):
    """The student and its distillation heads as one trainable module (what DDP wraps and
    torch.compile traces): its forward returns the logits, the projected pooled features and the
    adapted hint map (None where off)."""

    def __init__(self, student: nn.Module, heads: DistillationHeads, taps: FeatureTaps):
        super().__init__()
        self.student = student
        self.heads = heads
        self.taps = taps

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        logits = self.student(images)
        pooled, layer = self.taps.take()
        features = self.heads.projection(pooled) if self.heads.projection is not None and pooled is not None else None
        hint = self.heads.adapter(layer) if self.heads.adapter is not None and layer is not None else None
        return logits, features, hint
