"""Typed run configuration: YAML plus `key=value` overrides, validated into frozen dataclasses.

One dataclass per YAML section; defaults live only here. Every mistake raises `ConfigError`
naming the key's full path (`optim.lr: ...`), with a "did you mean" for unknown keys and
choices.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from fastkd.errors import ConfigError

Precision = Literal["auto", "bf16", "fp16", "fp32"]


class _FieldError(Exception):
    """Raised by `__post_init__` checks; the builder prefixes the section path."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise _FieldError(key, message)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    name: str = "run"
    """Run name; the run directory is `out_dir/name`."""
    out_dir: str = "runs"
    """Folder that holds the run directories."""
    seed: int = 0
    """Seeds weights, data order and augmentation."""
    log_every_steps: int = 50
    """Optimizer steps between progress-bar updates (each reads the on-device meters once)."""
    checkpoint_every_steps: int = 0
    """Also write `last.pt` every this many optimizer steps inside an epoch; 0 = at epoch ends only."""
    tensorboard: bool = True
    """Write TensorBoard scalars into the run directory."""

    def __post_init__(self) -> None:
        _require(bool(self.name) and "/" not in self.name and self.name not in (".", ".."),
                 "name", f"must be a plain folder name, got {self.name!r}")
        _require(self.log_every_steps >= 1, "log_every_steps", "must be >= 1")
        _require(self.checkpoint_every_steps >= 0, "checkpoint_every_steps", "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class SizeScheduleConfig:
    start_image_size: int
    """The training size at first; it grows to data.image_size over `ramp_epochs`."""
    ramp_epochs: tuple[int, int]
    """[first, last] (0-based epochs): `start_image_size` up to epoch `first`, then linear to data.image_size at epoch `last`, rounded to a multiple of `image_size_step`."""
    image_size_step: int = 32
    """Scheduled training sizes (and both ends) are multiples of this many pixels."""

    def __post_init__(self) -> None:
        _require(self.image_size_step >= 1, "image_size_step", f"must be >= 1, got {self.image_size_step}")
        _require(self.start_image_size >= 16 and self.start_image_size % self.image_size_step == 0, "start_image_size",
                 f"must be a multiple of data.size_schedule.image_size_step ({self.image_size_step}) and >= 16, got "
                 f"{self.start_image_size}")
        first, last = self.ramp_epochs
        _require(0 <= first < last, "ramp_epochs",
                 f"must be [first, last] epochs with 0 <= first < last, got {list(self.ramp_epochs)}")


@dataclass(frozen=True, kw_only=True)
class RandAugmentConfig:
    num_ops: int = 2
    """Ops per sample (torchvision's `num_ops`)."""
    magnitude: int = 9
    """The magnitude bin of every op (torchvision's `magnitude`), below `magnitude_bins`."""
    magnitude_bins: int = 31
    """Number of magnitude bins (torchvision's `num_magnitude_bins`)."""

    def __post_init__(self) -> None:
        _require(self.num_ops >= 1, "num_ops", f"must be >= 1, got {self.num_ops}")
        _require(self.magnitude_bins >= 2, "magnitude_bins", f"must be >= 2, got {self.magnitude_bins}")
        _require(0 <= self.magnitude < self.magnitude_bins, "magnitude",
                 f"must be within [0, magnitude_bins) = [0, {self.magnitude_bins}), got {self.magnitude}")


@dataclass(frozen=True, kw_only=True)
class TrivialAugmentConfig:
    magnitude_bins: int = 31
    """Number of magnitude bins each sample's one op draws its magnitude from (torchvision's `num_magnitude_bins`)."""

    def __post_init__(self) -> None:
        _require(self.magnitude_bins >= 2, "magnitude_bins", f"must be >= 2, got {self.magnitude_bins}")


@dataclass(frozen=True, kw_only=True)
class MixConfig:
    mixup_alpha: float = 0.0
    """mixup (timm's `--mixup`): each training sample blended with its partner (the other of its pair in the epoch's order) by lam ~ Beta(alpha, alpha); 0 = no mixup. The teacher sees the same mixed image."""
    cutmix_alpha: float = 0.0
    """CutMix (timm's `--cutmix`): a box of the partner's image pasted in, its area 1 - lam, lam ~ Beta(alpha, alpha); 0 = no CutMix."""
    prob: float = 1.0
    """Probability that a pair (or sample, `mode: elem`) is mixed at all (timm's `--mixup-prob`)."""
    switch_prob: float = 0.5
    """With both alphas set: probability of CutMix rather than mixup (timm's `--mixup-switch-prob`)."""
    mode: Literal["pair", "elem", "batch"] = "pair"
    """`pair`: one draw per pair of samples, both mixed with each other; `elem`: one draw per sample (timm's modes). timm's `batch` is refused: one draw per batch would depend on the batch size."""

    def __post_init__(self) -> None:
        for key in ("mixup_alpha", "cutmix_alpha"):
            _require(getattr(self, key) >= 0, key, f"must be >= 0 (0: off), got {getattr(self, key)}")
        _require(self.mixup_alpha > 0 or self.cutmix_alpha > 0, "mixup_alpha",
                 "must be > 0 where data.mix.cutmix_alpha is 0: the section would mix nothing (set one of them, or "
                 "remove data.mix)")
        for key in ("prob", "switch_prob"):
            _require(0 <= getattr(self, key) <= 1, key, f"must be within [0, 1], got {getattr(self, key)}")
        _require(self.mode != "batch", "mode",
                 "batch (one draw per batch) would make the mixed images depend on the batch size; use pair (one "
                 "draw per pair of samples) or elem")
        _require(self.switch_prob == 0.5 or (self.mixup_alpha > 0 and self.cutmix_alpha > 0), "switch_prob",
                 f"{self.switch_prob} has no effect: it chooses between mixup and CutMix, and only one of "
                 "data.mix.mixup_alpha, data.mix.cutmix_alpha is > 0 (remove it, or set both)")


@dataclass(frozen=True, kw_only=True)
class DaliConfig:
    device: Literal["auto", "gpu", "cpu"] = "auto"
    """Where DALI decodes: `gpu` (nvJPEG, `mixed`), `cpu`, or `auto` (gpu when the run trains on a CUDA GPU)."""
    hw_decoder_load: float = 0.65
    """Share of JPEGs sent to the GPU's hardware JPEG decoder (A100/H100); the rest use CUDA nvJPEG."""
    prefetch_queue: int = 2
    """Batches DALI prepares ahead of the training step."""
    cpu_resize: Literal["torch", "dali"] = "torch"
    """Training on the CPU: who resizes, flips and normalizes the decoded crops: `torch` (its uint8 antialiased kernel, after the pipeline: the faster) or `dali` (inside the pipeline). Unused on a GPU."""

    def __post_init__(self) -> None:
        _require(0.0 <= self.hw_decoder_load <= 1.0, "hw_decoder_load",
                 f"must be within [0, 1], got {self.hw_decoder_load}")
        _require(self.prefetch_queue >= 1, "prefetch_queue", f"must be >= 1, got {self.prefetch_queue}")


@dataclass(frozen=True, kw_only=True)
class SyntheticConfig:
    num_classes: int = 100
    """Number of classes."""
    train_samples: int = 6400
    """Training samples per epoch."""
    val_samples: int = 1280
    """Validation samples."""

    def __post_init__(self) -> None:
        _require(self.num_classes >= 2, "num_classes", "must be >= 2")
        _require(self.train_samples >= 1, "train_samples", "must be >= 1")
        _require(self.val_samples >= 1, "val_samples", "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    format: Literal["imagefolder", "mini-imagenet", "filelist"] = "imagefolder"
    """Dataset layout under `root` (see the README's data layouts)."""
    root: str = ""
    """Dataset folder; `~` and environment variables are expanded."""
    backend: Literal["torchvision", "dali", "synthetic"] = "torchvision"
    """Who decodes and augments: torchvision DataLoader (PIL), NVIDIA DALI (`data.dali`), or synthetic batches on the device (`data.synthetic`)."""
    image_size: int = 224
    """Training crop side (RandomResizedCrop) in pixels: the whole run's, or the end of `size_schedule`."""
    size_schedule: Optional[SizeScheduleConfig] = None
    """Progressive resolution: training starts at a lower size and grows to `image_size`; null = `image_size` throughout."""
    val_image_size: Optional[int] = None
    """Validation centre-crop side; null = `image_size` (train low, test high: set it above)."""
    val_resize: Optional[int] = None
    """Validation: shorter side resized to this many pixels before the centre crop; null = 8/7 of the validation crop (256 for 224)."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """Training RandomResizedCrop: range of the crop's area as a fraction of the image's (torchvision's default)."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Training RandomResizedCrop: range of the crop's aspect ratio, width / height (torchvision's default)."""
    batch_size: int = 64
    """Training images per step per process (the global batch is this times the world size); even with `mix`."""
    val_batch_size: Optional[int] = None
    """Validation images per batch per process; null = `batch_size`."""
    drop_last: bool = True
    """Training leaves out each epoch's partial last batch (as timm's training loader does): one update from a handful of images at full learning rate, with BatchNorm statistics of that handful, collapsed CIFAR-10 students. false keeps it. Validation always sees every image; a teacher-cache recording records every sample."""
    randaugment: Optional[RandAugmentConfig] = None
    """Training: torchvision's RandAugment (its 14 ops and magnitudes, nearest interpolation, fill 0), each sample's ops drawn from (seed, epoch, sample), after the crop and flip, before `mix`; the teacher sees the same ops. null = off."""
    trivialaugment: Optional[TrivialAugmentConfig] = None
    """Training: torchvision's TrivialAugmentWide, as `randaugment` (one op at a drawn magnitude); null = off."""
    mix: Optional[MixConfig] = None
    """mixup and/or CutMix of training batches (timm's semantics, drawn from (seed, epoch, sample)); null = off."""
    num_workers: Optional[int] = None
    """DataLoader worker processes or DALI CPU threads; null = one per available CPU core."""
    train_dir: str = "train"
    """imagefolder format: the training split's folder under `root` (one subfolder per class)."""
    val_dir: str = "val"
    """imagefolder format: the validation split's folder under `root` (CIFAR-10's JPEG folders: `test`)."""
    train_list: str = "train.txt"
    """filelist format: training list (`relative/path label` lines), relative to `root`."""
    val_list: str = "val.txt"
    """filelist format: validation list, relative to `root`."""
    classes_file: str = "classes.txt"
    """filelist format: class names, one per line in label order, relative to `root`."""
    generate_demo: bool = False
    """Generate the built-in demo dataset into `root` if it is not there yet."""
    verify_images: bool = True
    """Decode every image once before training (results cached) so a broken file stops the run before its first step."""
    skip_broken: bool = False
    """Train without the images that cannot be decoded (listed in a warning) instead of stopping."""
    dali: Optional[DaliConfig] = None
    """NVIDIA DALI's settings (backend dali only); null = their defaults."""
    synthetic: Optional[SyntheticConfig] = None
    """The synthetic batches' settings (backend synthetic only); null = their defaults."""
    seed: Optional[int] = None
    """Seed of the training stream (sample order, crops, flips); null = run.seed. Fix it to vary only the model's initialization across seeds, and share one teacher cache between them."""

    def __post_init__(self) -> None:
        _require(self.backend == "synthetic" or bool(self.root), "root",
                 "is required (the dataset folder) unless data.backend is synthetic")
        for key in ("train_dir", "val_dir"):
            name = getattr(self, key)
            _require(bool(name) and not Path(name).is_absolute() and ".." not in Path(name).parts, key,
                     f"must be a folder name under data.root, got {name!r}")
        _require(self.train_dir != self.val_dir, "val_dir",
                 f"must differ from data.train_dir (both {self.val_dir!r}): validating on training images")
        _require(self.image_size >= 16, "image_size", f"must be >= 16, got {self.image_size}")
        if self.size_schedule is not None:
            step = self.size_schedule.image_size_step
            _require(self.image_size % step == 0, "image_size",
                     f"must be a multiple of data.size_schedule.image_size_step ({step}) with a size schedule, got "
                     f"{self.image_size}")
        _require(self.val_image_size is None or self.val_image_size >= 16, "val_image_size",
                 f"must be >= 16 or null, got {self.val_image_size}")
        _require(self.val_resize is None or self.val_resize >= self.val_crop_size, "val_resize",
                 f"must be >= the validation crop (data.val_image_size or data.image_size: {self.val_crop_size}), "
                 f"got {self.val_resize}")
        low, high = self.crop_scale
        _require(0 < low <= high <= 1, "crop_scale", f"must be [low, high] with 0 < low <= high <= 1, got "
                 f"{list(self.crop_scale)}")
        low, high = self.crop_ratio
        _require(0 < low <= high, "crop_ratio", f"must be [low, high] with 0 < low <= high, got {list(self.crop_ratio)}")
        _require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.randaugment is None or self.trivialaugment is None, "trivialaugment",
                 "cannot be set with data.randaugment: a batch gets one of the two policies (remove one)")
        _require(self.mix is None or self.batch_size % 2 == 0, "batch_size",
                 f"must be even with data.mix (each sample is mixed with the other of its pair), got {self.batch_size}")
        _require(self.val_batch_size is None or self.val_batch_size >= 1, "val_batch_size",
                 f"must be >= 1 or null, got {self.val_batch_size}")
        _require(self.num_workers is None or self.num_workers >= 0, "num_workers",
                 f"must be >= 0 or null, got {self.num_workers}")
        for backend, section in (("dali", "dali"), ("synthetic", "synthetic")):
            _require(self.backend == backend or getattr(self, section) is None, section,
                     f"has no effect: data.backend is {self.backend}, not {backend} (remove it, or set the backend)")
        # The backend's section resolved: the run directory's config.yaml shows the settings used.
        if self.backend == "dali" and self.dali is None:
            object.__setattr__(self, "dali", DaliConfig())
        if self.backend == "synthetic" and self.synthetic is None:
            object.__setattr__(self, "synthetic", SyntheticConfig())

    @property
    def root_path(self) -> Path:
        return Path(_expand(self.root))

    @property
    def mixes(self) -> bool:
        """Whether training batches are mixed (mixup or CutMix)."""
        return self.mix is not None

    @property
    def val_crop_size(self) -> int:
        """The validation centre crop's side: `val_image_size`, or `image_size`."""
        return self.val_image_size or self.image_size

    @property
    def val_resize_size(self) -> int:
        """The validation resize of the shorter side: `val_resize`, or 8/7 of the crop (rounded)."""
        return self.val_resize or int(self.val_crop_size * 8 / 7 + 0.5)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    arch: str = "resnet18"
    """torchvision classification builder name (resnet18, shufflenet_v2_x1_0, mobilenet_v3_large, ...) or `timm:<name>` for a timm model (the timm extra)."""
    pretrained: str = ""
    """Initial weights (fine-tuning): a local file (fastkd checkpoint or state_dict), `torchvision:<Weights>` (e.g. torchvision:ResNet18_Weights.IMAGENET1K_V1) or `timm` (the timm model's pretrained weights); the last two download on first use. A classifier for another number of classes starts afresh. Empty = random init."""
    mean: Optional[tuple[float, float, float]] = None
    """Per-channel mean (of 0-1 pixels) the model's inputs are normalized with; null = the model's own (its pretrained weights', timm's config, else ImageNet's)."""
    std: Optional[tuple[float, float, float]] = None
    """Per-channel std of the model's input normalization; null = the model's own, as `mean`."""
    ema_decay: Optional[float] = None
    """Keep an exponential moving average of the weights with this decay per optimizer step (e.g. 0.9998), evaluated each epoch beside them, its best saved as best_ema.pt; null = none."""
    ema_warmup: bool = True
    """EMA decay warm-up (timm's): min(ema_decay, 1 - (1 + step)^(-2/3)), so early weights are not averaged in for long."""

    def __post_init__(self) -> None:
        _require(bool(self.arch), "arch", "must name a torchvision classification model (or timm:<name>)")
        _require(self.ema_decay is None or 0 < self.ema_decay < 1, "ema_decay",
                 f"must be within (0, 1) or null, got {self.ema_decay}")
        _require(self.std is None or all(v > 0 for v in self.std), "std", f"must be > 0, got {self.std}")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    name: Literal["sgd", "adamw", "adam"] = "sgd"
    """Optimizer (torch's fused implementation on CUDA)."""
    lr: float = 0.1
    """Peak learning rate, reached at the end of warm-up."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = False
    """SGD with Nesterov momentum."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam/AdamW betas."""
    weight_decay: float = 1e-4
    """L2 (SGD) or decoupled (AdamW) weight decay."""
    no_weight_decay_norm_bias: bool = False
    """Exempt normalization weights and all biases from weight decay."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy term."""
    epochs: int = 100
    """Training epochs."""
    schedule: Literal["cosine", "step", "multistep", "constant"] = "cosine"
    """Learning-rate schedule after warm-up, evaluated at every optimizer step."""
    warmup_epochs: float = 0.0
    """Linear warm-up length in epochs, stepped per iteration (0 = none)."""
    warmup_start_factor: float = 1e-3
    """Learning rate at step 0 as a fraction of `lr`."""
    min_lr_ratio: float = 1e-4
    """cosine: final learning rate as a fraction of `lr` (the original project's `lrf`)."""
    step_epochs: int = 30
    """step: multiply the learning rate by `gamma` every this many epochs."""
    milestones_epochs: tuple[int, ...] = (30, 60, 90)
    """multistep: epochs at which the learning rate is multiplied by `gamma`."""
    gamma: float = 0.1
    """step/multistep: decay factor."""
    grad_clip_norm: Optional[float] = None
    """Clip the global gradient norm to this value; null = no clipping."""
    implementation: Literal["torch", "apex"] = "torch"
    """`torch` (fused on CUDA) or NVIDIA apex's fused optimizers (must be installed by you)."""

    def __post_init__(self) -> None:
        _require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _require(0 <= self.momentum < 1, "momentum", f"must be within [0, 1), got {self.momentum}")
        _require(not self.nesterov or (self.name == "sgd" and self.momentum > 0), "nesterov",
                 "needs optim.name sgd with momentum > 0")
        _require(all(0 <= b < 1 for b in self.betas), "betas", f"must be within [0, 1), got {list(self.betas)}")
        _require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(0 <= self.label_smoothing < 1, "label_smoothing",
                 f"must be within [0, 1), got {self.label_smoothing}")
        _require(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        _require(0 <= self.warmup_epochs < self.epochs, "warmup_epochs",
                 f"must be within [0, optim.epochs={self.epochs}), got {self.warmup_epochs}")
        _require(0 < self.warmup_start_factor <= 1, "warmup_start_factor", "must be within (0, 1]")
        _require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be within [0, 1], got {self.min_lr_ratio}")
        _require(self.step_epochs >= 1, "step_epochs", f"must be >= 1, got {self.step_epochs}")
        _require(list(self.milestones_epochs) == sorted(set(self.milestones_epochs))
                 and all(m >= 1 for m in self.milestones_epochs),
                 "milestones_epochs", f"must be increasing positive epochs, got {list(self.milestones_epochs)}")
        _require(0 < self.gamma <= 1, "gamma", f"must be within (0, 1], got {self.gamma}")
        _require(self.grad_clip_norm is None or self.grad_clip_norm > 0, "grad_clip_norm",
                 f"must be > 0 or null, got {self.grad_clip_norm}")


@dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Training device; auto = cuda when available."""
    precision: Precision = "auto"
    """auto = bf16 on CUDA GPUs that support it (else fp16), fp32 on the CPU; fp16 uses a GradScaler."""
    channels_last: bool = True
    """Keep images, models and activations in channels-last memory format."""
    compile: bool = False
    """torch.compile the student (and teacher)."""
    deterministic: bool = False
    """Deterministic algorithms (bit-exact resume on the CPU); slower on GPUs."""
    sync_bn: bool = False
    """Convert BatchNorm to SyncBatchNorm when training with several processes."""
    sync_debug: bool = False
    """CUDA only: any host synchronisation inside a training step raises (a debugging aid: stalls show up as errors)."""
    threads: Optional[int] = None
    """torch's intra-op threads per process; null = torch's default (every core, or OMP_NUM_THREADS). On a small CPU machine 1 can be faster, and is when runs share it: `fastkd bench --what settings` measures it."""

    def __post_init__(self) -> None:
        _require(self.threads is None or self.threads >= 1, "threads", f"must be >= 1 or null, got {self.threads}")
        _require(not (self.sync_debug and self.sync_bn), "sync_debug",
                 "SyncBatchNorm synchronizes with the host in every step by design; turn runtime.sync_bn off to look "
                 "for host syncs")


@dataclass(frozen=True, kw_only=True)
class TeacherConfig:
    arch: str = ""
    """torchvision builder name of the teacher, or `timm:<name>`."""
    checkpoint: str = ""
    """A fastkd checkpoint (`best.pt` of a `fastkd train` run), a plain state_dict, or pretrained weights as they are: `torchvision:<Weights>` or `timm` (downloaded on first use; their classes must be the data's)."""
    mean: Optional[tuple[float, float, float]] = None
    """The teacher's input normalization (mean of 0-1 pixels); null = its own (a fastkd checkpoint's, its weights', timm's config, else ImageNet's). Batches (ImageNet-normalized by every backend) are remapped on the device when it differs."""
    std: Optional[tuple[float, float, float]] = None
    """The teacher's input normalization std; null = its own, as `mean`."""
    precision: Optional[Precision] = None
    """Teacher autocast precision; null = same as runtime.precision."""
    image_size: Optional[int] = None
    """The teacher's input size: each training crop is also resized to it for the teacher (the student gets its own size from `data`); null = the teacher sees the student's batch."""

    def __post_init__(self) -> None:
        _require(self.image_size is None or self.image_size >= 16, "image_size", f"must be >= 16 or null, got {self.image_size}")
        _require(bool(self.arch), "arch", "is required: the teacher's torchvision builder name")
        _require(bool(self.checkpoint), "checkpoint",
                 "is required: a trained teacher (fastkd never distils from a random teacher)")

    @property
    def checkpoint_path(self) -> Path:
        return Path(_expand(self.checkpoint))



@dataclass(frozen=True, kw_only=True)
class FeatureConfig:
    weight: float = 1.0
    """Weight of the feature term: the mean squared error between the student's pooled pre-logit features (the input of its classifier), through a learned Linear to the teacher's width when the widths differ, and the teacher's (timm's FeatureDistillationTask)."""

    def __post_init__(self) -> None:
        _require(self.weight > 0, "weight", f"must be > 0 (remove distill.feature to turn it off), got {self.weight}")


@dataclass(frozen=True, kw_only=True)
class HintConfig:
    student_layer: str
    """The student module whose output is the hint's input (a name of `model.named_modules()`, as torchvision's feature extraction names module outputs: `layer3`, `features.8`)."""
    teacher_layer: str
    """The teacher module whose output the adapted student map must match."""
    weight: float = 1.0
    """Weight of the hint term: the mean squared error between the student's map through a learned 1x1 convolution to the teacher's channels (resized to the teacher map's size when they differ) and the teacher's map (FitNets)."""

    def __post_init__(self) -> None:
        _require(self.weight > 0, "weight", f"must be > 0 (remove distill.hint to turn it off), got {self.weight}")
        for key in ("student_layer", "teacher_layer"):
            _require(bool(getattr(self, key)), key, "must name a module of the model")


@dataclass(frozen=True, kw_only=True)
class TokenConfig:
    hard: bool = False
    """false: the distillation head matches the teacher's softened logits (the logit term of `distill.loss` at `temperature`); true: the cross-entropy with the teacher's top class (DeiT's hard distillation)."""


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    teacher: TeacherConfig
    """The frozen teacher (required keys: arch, checkpoint)."""
    loss: Literal["kd", "dkd", "dist"] = "kd"
    """kd (Hinton), dkd (Decoupled KD, CVPR 2022) or dist (DIST, NeurIPS 2022)."""
    temperature: float = 4.0
    """Softmax temperature T of the distillation term (scaled by T^2)."""
    kd_weight: float = 0.9
    """Weight of the distillation term (the original project's `alpha`; `alpha: a` sets kd_weight=a, ce_weight=1-a)."""
    ce_weight: float = 0.1
    """Weight of the cross-entropy term with the true labels."""
    dkd_alpha: float = 1.0
    """dkd: weight of the target-class term (TCKD)."""
    dkd_beta: float = 8.0
    """dkd: weight of the non-target-class term (NCKD)."""
    dist_beta: float = 1.0
    """dist: weight of the inter-class relation term."""
    dist_gamma: float = 1.0
    """dist: weight of the intra-class relation term."""
    side_stream: bool = True
    """Run the teacher's forward on its own CUDA stream, overlapping the student's (no effect on the CPU)."""
    teacher_cache: str = ""
    """Folder of the teacher's recorded logits (`fastkd teacher-cache`): replayed instead of running the teacher; empty = live teacher."""
    teacher_cache_top_k: Optional[int] = None
    """Teacher cache: keep each sample's K largest logits and one for the rest (FKD-style, for ImageNet scale; `--top-k` when recording); a replay expects this kind of cache. null = every logit."""
    allow_weak_teacher: bool = False
    """Train even when the teacher's val top-1 is near chance level."""
    logit_standardization: bool = False
    """Z-score each sample's student and teacher logits, `(z - mean(z)) / std(z)` over the classes, before the logit term's temperature softmax (Sun et al., CVPR 2024); kd, dkd and dist alike."""
    feature: Optional[FeatureConfig] = None
    """Feature distillation of the pooled pre-logit features (timm's `feature` kind), its term beside the logit term and the cross-entropy; null = off."""
    hint: Optional[HintConfig] = None
    """A hint at a named intermediate layer (FitNets); needs the live teacher (feature maps are too big to cache); null = off."""
    token: Optional[TokenConfig] = None
    """Token distillation for timm models with a distillation head (`timm:*_distilled`, DeiT): the class head learns the labels (`ce_weight`), the distillation head the teacher (`kd_weight`); null = off."""

    def __post_init__(self) -> None:
        _require(self.teacher_cache_top_k is None or self.teacher_cache_top_k >= 1, "teacher_cache_top_k",
                 f"must be >= 1 or null (every logit), got {self.teacher_cache_top_k}")
        _require(self.teacher_cache_top_k is None or bool(self.teacher_cache), "teacher_cache_top_k",
                 "is set without distill.teacher_cache; a live teacher gives every logit (set both to record or replay "
                 "a top-k cache, or neither)")
        _require(not (self.loss == "dkd" and self.teacher_cache_top_k == 1), "teacher_cache_top_k",
                 "1 leaves dkd none of the teacher's non-target classes to distil (its NCKD term): keep 2 or more, "
                 "or use loss kd")
        _require(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        _require(self.kd_weight >= 0, "kd_weight", f"must be >= 0, got {self.kd_weight}")
        _require(self.ce_weight >= 0, "ce_weight", f"must be >= 0, got {self.ce_weight}")
        _require(self.kd_weight + self.ce_weight > 0 or self.feature is not None or self.hint is not None, "kd_weight",
                 "kd_weight and ce_weight cannot both be 0 without distill.feature or distill.hint")
        _require(self.hint is None or not self.teacher_cache, "hint",
                 "needs the live teacher: its intermediate feature maps are too big to cache (remove "
                 "distill.teacher_cache, or distill.hint)")
        _require(self.token is None or (self.feature is None and self.hint is None), "token",
                 "cannot be combined with distill.feature or distill.hint (a distilled model's two heads share their "
                 "pre-logit features)")
        _require(not (self.token is not None and self.token.hard and self.logit_standardization),
                 "logit_standardization", "has no effect with distill.token.hard (the teacher's top class is its "
                 "target; remove it)")
        for key in ("dkd_alpha", "dkd_beta", "dist_beta", "dist_gamma"):
            _require(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")

    @property
    def teacher_cache_path(self) -> Path:
        return Path(_expand(self.teacher_cache))


@dataclass(frozen=True, kw_only=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    """Run name, output folder, seed, logging."""
    data: DataConfig
    """Dataset, backend and augmentation sizes (required)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model being trained (the student when distilling)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Device, precision, memory format, compilation."""
    distill: Optional[DistillConfig] = None
    """Distillation settings; required by `fastkd distill`, refused by `fastkd train`."""

    def __post_init__(self) -> None:
        validate(self)

    @property
    def run_dir(self) -> Path:
        return Path(_expand(self.run.out_dir)) / self.run.name

    @property
    def data_seed(self) -> int:
        """The training stream's seed: data.seed, or run.seed when that is null."""
        return self.run.seed if self.data.seed is None else self.data.seed


def validate(cfg: Config) -> None:
    """Every rule that spans sections (a section's own rules are in its `__post_init__`); each
    broken rule is one `ConfigError` naming the key at fault. Runs whenever a `Config` is made."""
    data, kd = cfg.data, cfg.distill
    if kd is not None and kd.loss == "dkd" and data.mixes:
        raise ConfigError("distill.loss: dkd splits the teacher's and student's probabilities at each sample's one "
                          "label, which mixup and CutMix replace by two; use loss kd or dist with data.mix, or remove "
                          "data.mix")
    if kd is not None and kd.teacher_cache and data.backend == "synthetic":
        raise ConfigError("distill.teacher_cache: a teacher cache needs real data (data.backend torchvision or dali)")
    from fastkd.models import check_arch, family_of  # the model registry (imports torchvision)

    models = [("model.arch", cfg.model.arch, data.image_size)]
    if kd is not None:
        models.append(("distill.teacher.arch", kd.teacher.arch, kd.teacher.image_size or data.image_size))
    for key, arch, size in models:
        check_arch(arch, key)
        if family_of(arch).fixed_input_size(arch) and (data.size_schedule is not None or data.val_crop_size != size):
            raise ConfigError(f"{key}: {arch} is built for one input size ({size} px here): it cannot train with "
                              f"data.size_schedule or be validated at data.val_image_size {data.val_crop_size}")


SECTIONS: dict[str, type] = {
    "run": RunConfig, "data": DataConfig, "data.size_schedule": SizeScheduleConfig,
    "data.randaugment": RandAugmentConfig, "data.trivialaugment": TrivialAugmentConfig, "data.mix": MixConfig,
    "data.dali": DaliConfig, "data.synthetic": SyntheticConfig, "model": ModelConfig, "optim": OptimConfig,
    "runtime": RuntimeConfig, "distill": DistillConfig, "distill.teacher": TeacherConfig,
    "distill.feature": FeatureConfig, "distill.hint": HintConfig, "distill.token": TokenConfig,
}

# Keys that may change between a run and its `--resume` without changing its results.
RESUMABLE_CHANGES = frozenset({
    "run.log_every_steps", "run.checkpoint_every_steps", "run.tensorboard",
    "data.num_workers", "data.dali.prefetch_queue", "data.root", "data.generate_demo",
    "distill.teacher.checkpoint",
})

MOVED: dict[str, str] = {
    **{f"data.{old}": f"data.mix.{new}" for old, new in (
        ("mixup_alpha", "mixup_alpha"), ("cutmix_alpha", "cutmix_alpha"), ("mix_prob", "prob"),
        ("mix_switch_prob", "switch_prob"), ("mix_mode", "mode"))},
    "data.auto_augment": "a section of its own: data.randaugment or data.trivialaugment",
    "data.randaugment_num_ops": "data.randaugment.num_ops", "data.randaugment_magnitude": "data.randaugment.magnitude",
    "data.augment_magnitude_bins": "data.randaugment.magnitude_bins or data.trivialaugment.magnitude_bins",
    **{f"data.dali_{key}": f"data.dali.{key}" for key in ("device", "hw_decoder_load", "prefetch_queue", "cpu_resize")},
    **{f"data.synthetic_{key}": f"data.synthetic.{key}" for key in ("num_classes", "train_samples", "val_samples")},
    "data.start_image_size": "data.size_schedule.start_image_size",
    "data.size_ramp_epochs": "data.size_schedule.ramp_epochs",
    "data.image_size_step": "data.size_schedule.image_size_step",
}
"""Keys of earlier fastkd versions, and where they live now (named by the error a config using them gets)."""


def _expand(path: str) -> str:
    import os

    return os.path.expandvars(os.path.expanduser(path))


# --------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML file (or start from defaults when `path` is None), apply `key=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.start} is {exc.object[exc.start]:#04x}): "
                              "a config is YAML text") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            problem = " ".join(str(getattr(exc, "problem", None) or exc).split())  # one line
            raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (run, data, model, ...), "
                              f"got {type(loaded).__name__}")
        raw = loaded
    for item in overrides:
        apply_override(raw, item)
    return config_from_dict(raw)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (`true`, `0.1`, `[1, 2]`)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=0.05")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[:depth + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Validate a plain nested dict (as read from YAML) into a `Config`."""
    raw = dict(raw)
    distill = raw.get("distill")
    if isinstance(distill, dict) and "alpha" in distill:
        distill = dict(distill)
        alpha = distill.pop("alpha")
        clash = [k for k in ("kd_weight", "ce_weight") if k in distill]
        if clash:
            raise ConfigError(f"distill.alpha: give either alpha or {' and '.join(clash)}, not both "
                              "(alpha is shorthand for kd_weight=alpha, ce_weight=1-alpha)")
        alpha = _coerce(alpha, float, "distill.alpha")
        if not 0 <= alpha <= 1:
            raise ConfigError(f"distill.alpha: must be within [0, 1], got {alpha}")
        distill["kd_weight"], distill["ce_weight"] = alpha, 1.0 - alpha
        raw["distill"] = distill
    return _build(Config, raw, "")


def upgrade_saved_config(raw: dict[str, Any]) -> dict[str, Any]:
    """A config as a checkpoint of an earlier fastkd saved it (every key, flat data settings), in
    today's sections (`MOVED`), so that its runs still resume, export and evaluate. A user's YAML
    is never upgraded: a moved key there is an error naming its new place."""
    data = dict(raw.get("data") or {})
    if data and "drop_last" not in data:  # saved before the key existed: every partial batch was trained on
        data["drop_last"] = False
        raw = {**raw, "data": data}
    if not any(f"data.{key}" in MOVED for key in data):
        return raw
    old = {key: data.pop(key) for key in list(data) if f"data.{key}" in MOVED}
    if old.get("mixup_alpha", 0) or old.get("cutmix_alpha", 0):
        data["mix"] = {new.rsplit(".", 1)[1]: old[key.rsplit(".", 1)[1]] for key, new in MOVED.items()
                       if new.startswith("data.mix.") and key.rsplit(".", 1)[1] in old}
    policy = old.get("auto_augment", "none")
    if policy == "randaugment":
        data["randaugment"] = {"num_ops": old.get("randaugment_num_ops", 2), "magnitude": old.get("randaugment_magnitude", 9),
                               "magnitude_bins": old.get("augment_magnitude_bins", 31)}
    elif policy == "trivialaugment":
        data["trivialaugment"] = {"magnitude_bins": old.get("augment_magnitude_bins", 31)}
    for prefix, backend in (("dali_", "dali"), ("synthetic_", "synthetic")):
        if data.get("backend") == backend:
            data[backend] = {key[len(prefix):]: value for key, value in old.items() if key.startswith(prefix)}
    if old.get("start_image_size") is not None:
        data["size_schedule"] = {"start_image_size": old["start_image_size"], "ramp_epochs": old["size_ramp_epochs"],
                                 "image_size_step": old.get("image_size_step", 32)}
    return {**raw, "data": data}


def _build(cls: type, raw: Any, path: str) -> Any:
    where = path or "config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {_describe(raw)}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            full = f"{path}.{key}" if path else str(key)
            if full in MOVED:
                raise ConfigError(f"{full}: moved to {MOVED[full]}")
            raise ConfigError(f"{full}: unknown key{_suggest_key(str(key), names, path)}")
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in raw:
            raise ConfigError(f"{path}.{f.name}: is required" if path else f"{f.name}: is required")
    kwargs = {key: _coerce(value, hints[key], f"{path}.{key}" if path else key)
              for key, value in raw.items()}
    try:
        return cls(**kwargs)
    except _FieldError as exc:
        full = f"{path}.{exc.key}" if path else exc.key
        raise ConfigError(f"{full}: {exc.message}") from None


def _suggest_key(key: str, names: list[str], path: str) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {path + '.' if path else ''}{close[0]}?)"
    elsewhere = [f"{section}.{key}" for section, cls in SECTIONS.items()
                 if section != path and key in {f.name for f in dataclasses.fields(cls)}]
    if elsewhere:
        return f" (did you mean {elsewhere[0]}?)"
    return f"; valid keys: {', '.join(names)}"


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if len(options) == 1:
            return _coerce(value, options[0], key)
        raise TypeError(f"unsupported config type {tp}")  # pragma: no cover - config authoring error
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}{suggestion}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}: expected a string, got {_describe(value)}")
        return str(value)
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {_describe(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    raise TypeError(f"unsupported config type {tp}")  # pragma: no cover - config authoring error


# --------------------------------------------------------------------------------------------
# Saving and comparing


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (lists for tuples), loadable again by `config_from_dict`."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flatten(value, full))
        else:
            out[full] = value
    return out


def changed_keys(old: Config, new: Config) -> list[str]:
    """Keys whose values differ between two configs, ignoring the resume-safe ones."""
    a, b = flatten(config_to_dict(old)), flatten(config_to_dict(new))
    return sorted(k for k in a.keys() | b.keys()
                  if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES)


# --------------------------------------------------------------------------------------------
# Reference (README) generation


def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstrings written under each field of a config dataclass."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)):
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def reference_markdown() -> str:
    """The README's configuration reference: every key, its default and its meaning."""
    lines = []
    for section, cls in SECTIONS.items():
        lines += [f"### `{section}`", "", "| key | default | meaning |", "| --- | --- | --- |"]
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if dataclasses.is_dataclass(get_type_hints(cls)[f.name]) or required:
                default = "(section)"
            else:
                value = f.default if f.default is not dataclasses.MISSING else typing.cast(Any, f.default_factory)()
                default = "null" if value is None else yaml.safe_dump(config_to_dict_value(value),
                                                                       default_flow_style=True).strip()
                default = default.removesuffix("\n...").removesuffix(" ...")
            lines.append(f"| `{f.name}` | `{default}` | {docs.get(f.name, '')} |")
        lines.append("")
    return "\n".join(lines)


def config_to_dict_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
