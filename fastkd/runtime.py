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
from typing import ContextManager, Literal, cast

import numpy as np
import torch
from torch import nn

from fastkd.config import Precision, RuntimeConfig
from fastkd.errors import ConfigError
from pipelines.base import BatchSpec, Shard

ResolvedPrecision = Literal["bf16", "fp16", "fp32"]
STARTING_THREADS = torch.get_num_threads()
"""torch's intra-op threads when fastkd was imported: what `runtime.threads: null` keeps."""
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: ResolvedPrecision
    channels_last: bool
    compile: bool
    sync_bn: bool
    shard: Shard
    sync_debug: bool = False

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

    @staticmethod
    def input_dtype(precision: ResolvedPrecision) -> torch.dtype | None:
        """What a model run at `precision` needs its input cast to (None: autocast takes any float).

        An fp32 model runs without autocast, so the fp16 batches of a reduced-precision run (an
        fp32 teacher beside a bf16 student) must be cast first; fp32 batches pass unchanged.
        """
        return torch.float32 if precision == "fp32" else None

    def create_side_stream(self, enabled: bool) -> "torch.cuda.Stream | None":
        """A CUDA stream of its own (the teacher's), or None on the CPU or when disabled."""
        return torch.cuda.Stream(self.device) if enabled and self.device.type == "cuda" else None

    @property
    def process_group_backend(self) -> str:
        """NCCL for processes that train on GPUs, gloo for CPU processes (whatever the host has)."""
        return "nccl" if self.device.type == "cuda" else "gloo"

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
        model = model.to(self.device).to(memory_format=self.memory_format)
        if trainable and self.distributed and self.sync_bn:
            if self.device.type != "cuda":
                raise ConfigError("runtime.sync_bn: SyncBatchNorm needs CUDA GPUs; set it to false on the CPU")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        raw = model
        if trainable and self.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        if self.compile:
            model = cast(nn.Module, torch.compile(model))  # an OptimizedModule, called as the module
        return model, raw

    @staticmethod
    def set_threads(threads: int | None) -> None:
        """torch's intra-op threads for the run (`resolve_threads`), so that runs built one after
        another in a process (the bench's rows, tests) each get their own setting."""
        threads = resolve_threads(threads)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    def no_host_sync(self) -> ContextManager:
        """With `runtime.sync_debug` on a GPU: a host sync inside the block raises (else a no-op)."""
        if not (self.sync_debug and self.device.type == "cuda"):
            return contextlib.nullcontext()
        return _sync_debug_errors()

    def rng_untouched(self) -> ContextManager:
        """A block whose draws from torch's RNGs (this device's included) leave the run's streams as
        they were: what follows draws the same numbers whatever the block did."""
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def shard_from_env() -> Shard:
    """This process's place in a torchrun job (a single process when not launched by torchrun)."""
    return Shard(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)),
                 local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                 local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def resolve_device(requested: str, shard: Shard) -> torch.device:
    """This process's training device: one GPU per local process (torchrun's LOCAL_RANK).

    Several processes on one GPU would each hold a model, DALI buffers and an NCCL
    communicator on it (NCCL refuses two ranks on one device), so more local processes than
    visible GPUs is an error, unless each process was given its own GPU through a
    one-device CUDA_VISIBLE_DEVICES (then it is device 0 of every process).
    """
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device: cuda requested but no CUDA GPU is available "
                          "(torch.cuda.is_available() is False); use auto or cpu")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if shard.local_rank < count:
        return torch.device("cuda", shard.local_rank)
    masked = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if count == 1 and masked and "," not in masked:
        return torch.device("cuda", 0)
    raise ConfigError(f"runtime.device: {shard.local_world_size} CUDA processes on this node but {count} GPU(s) visible "
                      f"(local rank {shard.local_rank} has none): start at most {count} processes per node "
                      "(torchrun --nproc_per_node), or set runtime.device: cpu")


def resolve_threads(threads: int | None) -> int:
    """`runtime.threads`, or as many as the process started with (torch's default, or
    `OMP_NUM_THREADS`) when None."""
    return threads or STARTING_THREADS


def resolve_precision(requested: Precision, device: torch.device, key: str = "runtime.precision") -> ResolvedPrecision:
    if requested == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
        return "fp32"
    if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ConfigError(f"{key}: bf16 is not supported by this GPU; use fp16 or auto")
    return requested


def create_runtime(cfg: RuntimeConfig, shard: Shard | None = None) -> Runtime:
    shard = shard or shard_from_env()
    device = resolve_device(cfg.device, shard)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Runtime(device=device, precision=resolve_precision(cfg.precision, device),
                   channels_last=cfg.channels_last, compile=cfg.compile, sync_bn=cfg.sync_bn, shard=shard,
                   sync_debug=cfg.sync_debug)


@contextlib.contextmanager
def _sync_debug_errors():
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


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
    legacy = np.random.get_state(legacy=True)
    assert isinstance(legacy, tuple)
    _, np_keys, np_pos, np_has_gauss, np_gauss = legacy
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
