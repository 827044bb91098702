"""Model registry: any torchvision classification builder, by name, randomly initialized."""

from __future__ import annotations

import difflib
import functools

import torch
import torchvision
from torch import nn

from fastkd.errors import ConfigError


@functools.cache
def classification_archs() -> tuple[str, ...]:
    return tuple(torchvision.models.list_models(module=torchvision.models))


def check_arch(arch: str, key: str = "model.arch") -> None:
    names = classification_archs()
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else "; see torchvision.models.list_models()"
        raise ConfigError(f"{key}: {arch!r} is not a torchvision classification model{hint}")


def create_model(arch: str, num_classes: int, *, image_size: int = 224, key: str = "model.arch") -> nn.Module:
    """`torchvision.models.<arch>(num_classes=N)` with random weights (nothing is downloaded)."""
    check_arch(arch, key)
    kwargs: dict = {"weights": None, "num_classes": num_classes}
    if arch in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)  # one logits tensor, like every other model
    if arch.startswith("vit_"):
        kwargs["image_size"] = image_size
    return torchvision.models.get_model(arch, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: how a teacher is held."""
    model.eval()
    model.requires_grad_(False)
    return model


def state_dict_for_export(model: nn.Module) -> dict[str, torch.Tensor]:
    """A plain CPU state_dict that `torchvision.models.<arch>(num_classes=N)` loads strictly."""
    return {k: v.detach().to("cpu", memory_format=torch.contiguous_format).clone()
            for k, v in model.state_dict().items()}
