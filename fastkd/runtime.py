"""Device, precision, memory format, compilation and DDP: the one place the wrap order lives.

Wrap order of a trainable model: move to device -> channels-last -> SyncBatchNorm (several
processes) -> DDP (several processes) -> torch.compile. Compiling the DDP-wrapped module is
the order PyTorch documents for DDP + compile (its DDPOptimizer splits the graph at bucket
boundaries so gradient all-reduce still overlaps the backward). Checkpoints always save the
raw module, so state_dict keys carry no `module.` or `_orig_mod.` prefixes.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from typing import ContextManager, Literal

import numpy as np
import torch
from torch import nn

from fastkd.config import Precision, RuntimeConfig
from fastkd.errors import ConfigError
from pipelines.base import BatchSpec, Shard

ResolvedPrecision = Literal["bf16", "fp16", "fp32"]
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: ResolvedPrecision
    channels_last: bool
    compile: bool
    sync_bn: bool
    shard: Shard

    @property
    def is_main(self) -> bool:
        return self.shard.rank == 0

    @property
    def distributed(self) -> bool:
        return self.shard.world_size > 1

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def batch_spec(self) -> BatchSpec:
        # Reduced precision on a GPU: half-size input batches (DALI has no bf16 output; autocast
        # casts the first convolution's input to bf16 anyway).
        dtype = torch.float16 if self.device.type == "cuda" and self.precision != "fp32" else torch.float32
        return BatchSpec(device=self.device, dtype=dtype, memory_format=self.memory_format)

    def resolve_precision(self, precision: Precision | None) -> ResolvedPrecision:
        return self.precision if precision in (None, "auto") else precision  # type: ignore[return-value]

    def autocast(self, precision: ResolvedPrecision | None = None) -> ContextManager:
        precision = precision or self.precision
        if precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_AMP_DTYPES[precision])

    def create_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler that is a no-op unless training in fp16."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def prepare_model(self, model: nn.Module, *, trainable: bool) -> tuple[nn.Module, nn.Module]:
        """Place and wrap a model; returns (module to call, raw module to save)."""
        model = model.to(self.device, memory_format=self.memory_format)
        if trainable and self.distributed and self.sync_bn:
            if self.device.type != "cuda":
                raise ConfigError("runtime.sync_bn: SyncBatchNorm needs CUDA GPUs; set it to false on the CPU")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        raw = model
        if trainable and self.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        if self.compile:
            model = torch.compile(model)
        return model, raw

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def shard_from_env() -> Shard:
    """This process's place in a torchrun job (a single process when not launched by torchrun)."""
    return Shard(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)),
                 local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def resolve_device(requested: str, shard: Shard) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device: cuda requested but no CUDA GPU is available "
                          "(torch.cuda.is_available() is False); use auto or cpu")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", shard.local_rank % torch.cuda.device_count())


def resolve_precision(requested: Precision, device: torch.device, key: str = "runtime.precision") -> ResolvedPrecision:
    if requested == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{key}: bf16 is not supported by this GPU; use fp16 or auto")
    return requested


def create_runtime(cfg: RuntimeConfig, shard: Shard | None = None) -> Runtime:
    shard = shard or shard_from_env()
    device = resolve_device(cfg.device, shard)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Runtime(device=device, precision=resolve_precision(cfg.precision, device),
                   channels_last=cfg.channels_last, compile=cfg.compile, sync_bn=cfg.sync_bn, shard=shard)


def seed_everything(seed: int, *, deterministic: bool) -> None:
    """Seed every RNG; with `deterministic`, ask for deterministic kernels (bit-exact resume)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")  # TF32 matmuls/convolutions on Ampere and newer


def rng_state() -> dict:
    """All host and device RNG states, as tensors and plain values (safe for weights_only loading)."""
    _, py_state, py_gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(py_state), "python_gauss": py_gauss,
             "numpy": torch.from_numpy(np_keys.astype(np.int64)), "numpy_rest": [int(np_pos), int(np_has_gauss),
                                                                                  float(np_gauss)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    pos, has_gauss, gauss = state["numpy_rest"]
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
