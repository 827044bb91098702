"""Model registry: any torchvision classification builder, by name, randomly initialized."""

from __future__ import annotations

import difflib
import functools
from pathlib import Path

import torch
import torchvision
from torch import nn

from fastkd.errors import CheckpointError, ConfigError


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


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys saved from DDP- or torch.compile-wrapped models, as plain module keys."""
    out = {}
    for key, value in state_dict.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def describe_class_difference(theirs: list[str], ours: list[str]) -> str:
    if set(theirs) == set(ours):
        first = next(i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b)
        return (f"same {len(ours)} classes in another order (label {first} is {theirs[first]!r} for the "
                f"teacher, {ours[first]!r} in the data)")
    missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    parts = [f"teacher has {len(theirs)} classes, the data {len(ours)}"]
    if missing:
        parts.append(f"not in the teacher: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if extra:
        parts.append(f"not in the data: {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    return "; ".join(parts)


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: Path, arch: str,
                 num_classes: int, key: str | None = None, hint: str = "") -> None:
    """`model.load_state_dict(state_dict, strict=True)` with a one-line error naming `source`
    (and `key`, the config key or argument that named it) and what does not fit, whole.

    The one place every weight file is put into a model: resume, eval, export and teachers.
    """
    expected = model.state_dict()
    try:
        model.load_state_dict(state_dict, strict=True)
    except (RuntimeError, KeyError, TypeError):
        prefix = f"{key}: " if key else ""
        raise CheckpointError(f"{prefix}{source} does not fit {arch} with {num_classes} classes: "
                              f"{describe_state_dict_difference(state_dict, expected)}{hint}") from None


def describe_state_dict_difference(got: dict[str, Any], expected: dict[str, torch.Tensor], *, show: int = 3) -> str:
    """What keeps `got` from loading into a model whose state_dict is `expected`: missing and
    unexpected keys and shape mismatches, counted, the first few named in full."""
    def names(items: list[str]) -> str:
        return ", ".join(items[:show]) + (f", ... ({len(items) - show} more)" if len(items) > show else "")

    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k} {list(got[k].shape)} vs the model's {list(v.shape)}" for k, v in expected.items()
              if k in got and isinstance(got[k], torch.Tensor) and got[k].shape != v.shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} key(s) missing from the file ({names(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) ({names(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es) ({names(shapes)})")
    return "; ".join(parts) or "its tensors could not be copied into the model"


def load_teacher(arch: str, checkpoint: Path, classes: list[str], *, image_size: int = 224) -> nn.Module:
    """A trained teacher, loaded strictly; every mismatch is an error naming the checkpoint.

    Accepts a fastkd checkpoint (its arch and class names are checked against the run) or a
    plain torchvision state_dict (optionally under a `state_dict`/`model` key, with DDP or
    torch.compile prefixes), whose shapes must fit `arch` with `len(classes)` outputs.
    """
    from fastkd.checkpoint import is_fastkd_checkpoint, load_checkpoint

    key = "distill.teacher.checkpoint"
    payload = load_checkpoint(checkpoint, key=key)
    if is_fastkd_checkpoint(payload):
        if payload["arch"] != arch:
            raise CheckpointError(f"{key}: {checkpoint} holds a {payload['arch']}, but distill.teacher.arch is {arch}")
        if list(payload["classes"]) != list(classes):
            raise CheckpointError(f"{key}: {checkpoint} was trained on other classes than this dataset's: "
                                  f"{describe_class_difference(list(payload['classes']), list(classes))}")
        state_dict = payload["model"]
    else:
        state_dict = payload
        for nested in ("state_dict", "model"):
            if isinstance(state_dict.get(nested), dict):
                state_dict = state_dict[nested]
        if not state_dict or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
            raise CheckpointError(f"{key}: {checkpoint} is neither a fastkd checkpoint nor a state_dict")
        state_dict = _strip_wrapper_prefixes(state_dict)
    model = create_model(arch, len(classes), image_size=image_size, key="distill.teacher.arch")
    load_weights(model, state_dict, source=checkpoint, arch=arch, num_classes=len(classes), key=key)
    return freeze(model)
