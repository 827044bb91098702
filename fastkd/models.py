"""Model registry: each family of classification models (`FAMILIES`: torchvision's builders by
name, timm's as `timm:<name>` with the optional `timm` extra) says how to create its models, what
normalization and pretrained weights they have and whether they take one input size only; the
rest of fastkd asks `family_of(arch)`. Also: weights put into models with one-line errors, and
the one place an input normalization is decided (`resolve_normalization`).
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
import torchvision
from torch import nn

from fastkd.errors import CheckpointError, ConfigError
from pipelines.base import IMAGENET_MEAN, IMAGENET_STD  # what every backend normalizes batches with

TIMM_PREFIX = "timm:"
TORCHVISION_WEIGHTS_PREFIX = "torchvision:"
TIMM_HINT = "pip install timm (in a checkout of fastkd: pip install -e '.[timm]'; from a package: 'fastkd[timm]')"


class ModelFamily(Protocol):
    """A source of classification models: how to name, create and initialize one, and what it
    expects. `family_of(arch)` finds an arch's family; nothing else looks at an arch's prefix."""

    name: str
    weights_names: str
    """What `model.pretrained` / `distill.teacher.checkpoint` writes to name this family's own
    pretrained weights (downloaded on first use)."""

    def owns(self, arch: str) -> bool: ...

    def owns_weights(self, spec: str) -> bool: ...

    def check(self, arch: str, key: str) -> None:
        """One `ConfigError` naming `key` when `arch` is not one of the family's models."""

    def create(self, arch: str, num_classes: int, image_size: int, key: str) -> nn.Module:
        """A randomly initialized model (nothing downloads), built for `image_size` when it takes one size."""

    def fixed_input_size(self, arch: str) -> bool:
        """Whether the model takes inputs of the one size it was created for (ViTs)."""

    def own_normalization(self, arch: str, weights: str) -> Normalization | None:
        """The input normalization its weights (`weights`: a weights name of this family, or "") expect, if known."""

    def pretrained_state_dict(self, arch: str, spec: str, key: str) -> dict[str, torch.Tensor]:
        """The weights a weights name of this family names (the one place fastkd downloads)."""

    def weights_identity(self, arch: str, spec: str) -> str:
        """What a weights name stands for, for a teacher cache's key (it changes when the file would)."""


class TorchvisionModels:
    """torchvision's classification builders by name (`resnet18`), weights as `torchvision:<Weights>`."""

    name = "torchvision"
    weights_names = f"{TORCHVISION_WEIGHTS_PREFIX}<Weights> (e.g. {TORCHVISION_WEIGHTS_PREFIX}ResNet18_Weights.IMAGENET1K_V1)"
    SIZED = {"vit_": "image_size", "maxvit_": "input_size"}
    """Builders whose models take one input size, and the argument that sets it."""

    def owns(self, arch: str) -> bool:
        return not arch.startswith(TIMM_PREFIX)

    def owns_weights(self, spec: str) -> bool:
        return spec.startswith(TORCHVISION_WEIGHTS_PREFIX)

    def check(self, arch: str, key: str) -> None:
        names = classification_archs()
        if arch not in names:
            close = difflib.get_close_matches(arch, names, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else "; see torchvision.models.list_models(), or timm:<name>"
            raise ConfigError(f"{key}: {arch!r} is not a torchvision classification model{hint}")

    def _size_argument(self, arch: str) -> str | None:
        return next((argument for prefix, argument in self.SIZED.items() if arch.startswith(prefix)), None)

    def create(self, arch: str, num_classes: int, image_size: int, key: str) -> nn.Module:
        kwargs: dict = {"weights": None, "num_classes": num_classes}
        if arch in ("googlenet", "inception_v3"):
            kwargs.update(aux_logits=False, init_weights=True)  # one logits tensor, like every other model
        argument = self._size_argument(arch)
        if argument == "image_size":
            kwargs["image_size"] = image_size
        elif argument == "input_size":
            kwargs["input_size"] = (image_size, image_size)
        return torchvision.models.get_model(arch, **kwargs)

    def fixed_input_size(self, arch: str) -> bool:
        return self._size_argument(arch) is not None

    def own_normalization(self, arch: str, weights: str) -> Normalization | None:
        if not self.owns_weights(weights):
            return None
        transforms = torchvision_weights(weights, "weights").transforms()
        return Normalization.of(transforms.mean, transforms.std)

    def pretrained_state_dict(self, arch: str, spec: str, key: str) -> dict[str, torch.Tensor]:
        return torchvision_weights(spec, key).get_state_dict(progress=True)

    def weights_identity(self, arch: str, spec: str) -> str:
        return torchvision_weights(spec, "distill.teacher.checkpoint").url  # the URL holds the file's hash


class TimmModels:
    """timm's models as `timm:<name>` (the optional timm extra), their own weights as `timm`."""

    name = "timm"
    weights_names = "timm (the timm model's own pretrained weights)"

    def owns(self, arch: str) -> bool:
        return arch.startswith(TIMM_PREFIX)

    def owns_weights(self, spec: str) -> bool:
        return spec == "timm"

    @staticmethod
    def _timm(key: str):
        try:
            import timm
        except ImportError:
            raise ConfigError(f"{key}: timm models need the timm package: {TIMM_HINT}") from None
        return timm

    def _config(self, arch: str, key: str = "model.arch"):
        return self._timm(key).models.get_pretrained_cfg(arch[len(TIMM_PREFIX):])

    def check(self, arch: str, key: str) -> None:
        timm = self._timm(key)
        name = arch[len(TIMM_PREFIX):]
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=1, cutoff=0.6)
            hint = f" (did you mean {TIMM_PREFIX}{close[0]}?)" if close else "; see timm.list_models()"
            raise ConfigError(f"{key}: {name!r} is not a timm model{hint}")

    def create(self, arch: str, num_classes: int, image_size: int, key: str) -> nn.Module:
        # a model built for one input size (a ViT) takes the run's, as torchvision's vit_* do
        size = {"img_size": image_size} if self.fixed_input_size(arch) else {}
        return self._timm(key).create_model(arch[len(TIMM_PREFIX):], pretrained=False, num_classes=num_classes, **size)

    def fixed_input_size(self, arch: str) -> bool:
        cfg = self._config(arch)
        return cfg is not None and bool(getattr(cfg, "fixed_input_size", False))

    def own_normalization(self, arch: str, weights: str) -> Normalization | None:
        cfg = self._config(arch)
        if cfg is not None and cfg.mean and cfg.std:
            return Normalization.of(cfg.mean, cfg.std)
        return None

    def pretrained_state_dict(self, arch: str, spec: str, key: str) -> dict[str, torch.Tensor]:
        return self._timm(key).create_model(arch[len(TIMM_PREFIX):], pretrained=True).state_dict()

    def weights_identity(self, arch: str, spec: str) -> str:
        # timm's model, pretrained tag and version: a tag's default can change between versions
        timm = self._timm("distill.teacher.checkpoint")
        cfg = self._config(arch, "distill.teacher.checkpoint")
        return f"{arch}.{getattr(cfg, 'tag', None) or 'default'} (timm {timm.__version__})"


FAMILIES: tuple[ModelFamily, ...] = (TimmModels(), TorchvisionModels())
"""Every model family; the first that owns an arch serves it (torchvision's owns every arch
without another family's prefix). A new family is one class here."""


def family_of(arch: str) -> ModelFamily:
    return next(family for family in FAMILIES if family.owns(arch))


def is_weights_name(spec: str) -> bool:
    """Pretrained weights named (`torchvision:<Weights>`, `timm`: downloaded), not a file."""
    return any(family.owns_weights(spec) for family in FAMILIES)


@functools.cache
def classification_archs() -> tuple[str, ...]:
    return tuple(torchvision.models.list_models(module=torchvision.models))


def check_arch(arch: str, key: str = "model.arch") -> None:
    family_of(arch).check(arch, key)


def create_model(arch: str, num_classes: int, *, image_size: int = 224, key: str = "model.arch") -> nn.Module:
    """`arch` with `num_classes` outputs and random weights (nothing is downloaded here), built for
    `image_size` when its family's model takes one input size."""
    family = family_of(arch)
    family.check(arch, key)
    return family.create(arch, num_classes, image_size, key)


# --- pretrained weights and input normalization -------------------------------------------------

@dataclass(frozen=True)
class Normalization:
    """The per-channel mean and std (of 0-1 pixels) a model's inputs are normalized with."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def of(cls, mean: Sequence[float], std: Sequence[float]) -> "Normalization":
        """From any sequences of three values (a config's, a checkpoint's lists)."""
        (m0, m1, m2), (s0, s1, s2) = (float(v) for v in mean), (float(v) for v in std)
        return cls((m0, m1, m2), (s0, s1, s2))

    def as_dict(self) -> dict[str, list[float]]:
        return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}

    @property
    def is_imagenet(self) -> bool:
        return self.as_dict() == Normalization().as_dict()


def torchvision_weights(name: str, key: str):
    """The torchvision weights enum of `torchvision:<Enum>.<TAG>` (resolving it downloads nothing)."""
    spec = name[len(TORCHVISION_WEIGHTS_PREFIX):]
    try:
        return torchvision.models.get_weight(spec)
    except (ValueError, AttributeError, KeyError):
        raise ConfigError(f"{key}: {spec!r} is not a torchvision weights name (e.g. "
                          f"{TORCHVISION_WEIGHTS_PREFIX}ResNet18_Weights.IMAGENET1K_V1)") from None


def resolve_normalization(arch: str, mean: Sequence[float] | None, std: Sequence[float] | None, *,
                          weights: str | Path = "", checkpoint: dict[str, Any] | None = None,
                          key: str = "model.pretrained") -> Normalization:
    """The one place a model's input normalization is decided (student, teacher, teacher cache key,
    `fastkd eval` alike): the config's `mean`/`std` where given, else what the weights record (a
    fastkd checkpoint's `normalization`: `checkpoint` when the caller has loaded it, else read from
    the `weights` file, named by `key` in an error), else what a weights name or the model's family
    says, else ImageNet's."""
    spec = str(weights)
    if checkpoint is None and spec and not is_weights_name(spec):
        from fastkd.checkpoint import is_fastkd_checkpoint, load_checkpoint

        payload = load_checkpoint(Path(spec).expanduser(), key=key)  # a missing or unreadable file is an error here
        checkpoint = payload if is_fastkd_checkpoint(payload) else None
    own = None
    if checkpoint is not None and checkpoint.get("normalization"):
        recorded = checkpoint["normalization"]
        own = Normalization.of(recorded["mean"], recorded["std"])
    own = own or family_of(arch).own_normalization(arch, spec) or Normalization()
    return Normalization.of(own.mean if mean is None else mean, own.std if std is None else std)


NORMALIZATION = "fastkd_normalization"
"""The attribute `attach_input_normalization` records a model's normalization in."""


def attach_input_normalization(model: nn.Module, normalization: Normalization,
                               batches: Normalization = Normalization()) -> nn.Module:
    """Make `model` take batches normalized with `batches` (every backend's: ImageNet's) while it
    sees inputs normalized with its own statistics: one multiply-add per element on the device,
    in a forward pre-hook, its two [1, 3, 1, 1] factors non-persistent buffers (they follow the
    model's device; the state_dict is unchanged). Nothing is attached when they agree."""
    setattr(model, NORMALIZATION, normalization)  # what the weights expect (checkpoints and export record it)
    if normalization.as_dict() == batches.as_dict():
        return model
    mean_b, std_b = torch.tensor(batches.mean), torch.tensor(batches.std)
    mean_m, std_m = torch.tensor(normalization.mean), torch.tensor(normalization.std)
    # x_model = (x * std_b + mean_b - mean_m) / std_m = x * scale + shift
    model.register_buffer("fastkd_input_scale", (std_b / std_m).view(1, 3, 1, 1), persistent=False)
    model.register_buffer("fastkd_input_shift", ((mean_b - mean_m) / std_m).view(1, 3, 1, 1), persistent=False)
    model.register_forward_pre_hook(_renormalize)
    return model


def input_normalization(model: nn.Module) -> Normalization:
    """The normalization `attach_input_normalization` gave `model` (or the model it wraps)."""
    normalization = getattr(model, NORMALIZATION)
    assert isinstance(normalization, Normalization)
    return normalization


def _renormalize(module: nn.Module, args: tuple) -> tuple:
    images = args[0]
    scale, shift = getattr(module, "fastkd_input_scale"), getattr(module, "fastkd_input_shift")
    if scale.dtype != images.dtype:  # fp16 batches (AMP on a GPU) stay fp16
        scale, shift = scale.to(images.dtype), shift.to(images.dtype)
    return (torch.addcmul(shift, images, scale), *args[1:])


def classifier(model: nn.Module) -> nn.Module:
    """The model's final classifier: timm's `get_classifier()`, else its last Linear or Conv2d.
    Its input is the model's pooled pre-logit features."""
    get_classifier = getattr(model, "get_classifier", None)  # timm's models name their head
    head = get_classifier() if callable(get_classifier) else None
    if not isinstance(head, nn.Module):
        head = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    return head


def classifier_keys(model: nn.Module) -> set[str]:
    """The state_dict keys of the model's final classifier (a new head for other classes)."""
    head = classifier(model)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for p in head.parameters() if id(p) in names}


def weights_identity(spec: str, arch: str) -> str:
    """What a weights name stands for, for a teacher cache's key (its family says)."""
    return family_of(arch).weights_identity(arch, spec)


def read_pretrained(spec: str, arch: str, num_classes: int, *, key: str) -> dict[str, torch.Tensor]:
    """The state_dict that `spec` names: a local file, or a weights name of the arch's family
    (`torchvision:<Weights>`, `timm`), downloaded into torch's or Hugging Face's cache on first
    use: the one place fastkd downloads anything, and only when a config asks for it."""
    if is_weights_name(spec):
        family = family_of(arch)
        if not family.owns_weights(spec):
            raise ConfigError(f"{key}: {spec!r} names another family's weights than {arch}'s ({family.name}): "
                              f"{family.weights_names}")
        return family.pretrained_state_dict(arch, spec, key)
    from fastkd.checkpoint import is_fastkd_checkpoint, load_checkpoint

    payload = load_checkpoint(Path(spec).expanduser(), key=key)
    return payload["model"] if is_fastkd_checkpoint(payload) else plain_state_dict(payload, source=spec, key=key)


def plain_state_dict(payload: dict[str, Any], *, source: Path | str, key: str) -> dict[str, torch.Tensor]:
    """The state_dict in a file that is not a fastkd checkpoint: as it is or under a
    `state_dict`/`model` key, with DDP and torch.compile prefixes stripped."""
    for nested in ("state_dict", "model"):
        if isinstance(payload.get(nested), dict):
            payload = payload[nested]
    if not payload or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise CheckpointError(f"{key}: {source} is neither a fastkd checkpoint nor a state_dict")
    return _strip_wrapper_prefixes(payload)


def load_pretrained(model: nn.Module, spec: str, *, arch: str, num_classes: int, key: str = "model.pretrained"
                    ) -> list[str]:
    """Initialize `model` from pretrained weights (fine-tuning). Every tensor must fit, except the
    final classifier's when the weights were trained for another number of classes: that one
    keeps its random initialization. Returns the keys left at their initialization."""
    state_dict = read_pretrained(spec, arch, num_classes, key=key)
    expected = model.state_dict()
    head = classifier_keys(model)
    reinitialized = sorted(k for k in head if k in state_dict and state_dict[k].shape != expected[k].shape)
    fitting = {k: v for k, v in state_dict.items() if k not in reinitialized}
    missing = [k for k in expected if k not in fitting and k not in reinitialized]
    unexpected = [k for k in fitting if k not in expected]
    if missing or unexpected or any(fitting[k].shape != expected[k].shape for k in fitting if k in expected):
        raise CheckpointError(f"{key}: {spec} does not fit {arch}: "
                              f"{describe_state_dict_difference(state_dict, expected)}")
    model.load_state_dict({**expected, **fitting}, strict=True)
    return reinitialized


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


def load_teacher(arch: str, checkpoint: Path | str, classes: list[str], *, image_size: int = 224,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> nn.Module:
    """A trained teacher, loaded strictly; every mismatch is an error naming the checkpoint.

    Accepts a fastkd checkpoint (its arch and class names are checked against the run), a plain
    state_dict (optionally under a `state_dict`/`model` key, with DDP or torch.compile prefixes),
    whose shapes must fit `arch` with `len(classes)` outputs, or pretrained weights as they are
    (`torchvision:<Weights>`, `timm`: downloaded on first use). The teacher takes the run's
    batches and sees them normalized its own way (`attach_input_normalization`; the statistics
    are in `teacher.fastkd_normalization`).
    """
    from fastkd.checkpoint import is_fastkd_checkpoint, load_checkpoint

    key = "distill.teacher.checkpoint"
    spec = str(checkpoint)
    payload: dict[str, Any] | None = None
    if is_weights_name(spec):
        state_dict = read_pretrained(spec, arch, len(classes), key=key)
    else:
        checkpoint = Path(checkpoint)
        payload = load_checkpoint(checkpoint, key=key)
        if is_fastkd_checkpoint(payload):
            if payload["arch"] != arch:
                raise CheckpointError(f"{key}: {checkpoint} holds a {payload['arch']}, but distill.teacher.arch is {arch}")
            if list(payload["classes"]) != list(classes):
                raise CheckpointError(f"{key}: {checkpoint} was trained on other classes than this dataset's: "
                                      f"{describe_class_difference(list(payload['classes']), list(classes))}")
            state_dict = payload["model"]
        else:
            state_dict = plain_state_dict(payload, source=checkpoint, key=key)
            payload = None
    model = create_model(arch, len(classes), image_size=image_size, key="distill.teacher.arch")
    hint = (" (pretrained weights are used as they are: their classes must be the data's; fine-tune them first with "
            "`fastkd train` and model.pretrained)") if payload is None and not Path(spec).exists() else ""
    load_weights(model, state_dict, source=Path(spec), arch=arch, num_classes=len(classes), key=key, hint=hint)
    normalization = resolve_normalization(arch, mean, std, weights=spec, checkpoint=payload or {})
    attach_input_normalization(model, normalization)
    return freeze(model)
