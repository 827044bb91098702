"""The torchrun job's process group and the collectives the assembly uses around it: every rank
calls each of these at the same point, and each is a no-op in a single process."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch.distributed as dist

from fastkd.config import RuntimeConfig
from fastkd.runtime import Runtime, create_runtime, shard_from_env


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def started(cfg: RuntimeConfig) -> Iterator[Runtime]:
    """This process's runtime, inside the torchrun job's process group when there is one."""
    shard = shard_from_env()
    runtime = create_runtime(cfg, shard)
    with process_group(shard.world_size, runtime):
        yield runtime


@contextlib.contextmanager
def process_group(world_size: int, runtime: Runtime) -> Iterator[None]:
    if world_size <= 1 or initialized():
        yield
        return
    # The backend follows the device this process trains on, not what the host has: CPU
    # processes on a GPU host (runtime.device: cpu) all-reduce CPU tensors, which NCCL cannot.
    device_id = runtime.device if runtime.device.type == "cuda" else None
    dist.init_process_group(backend=runtime.process_group_backend, device_id=device_id)
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    if initialized():
        dist.barrier()


def from_rank_0(value: Any) -> Any:
    """Rank 0's `value` on every rank (itself without a process group)."""
    if not initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def rank_0_first(load: Callable[[], Any], *, downloads: bool) -> Any:
    """`load()` on every rank; when it downloads, rank 0 first (into the shared cache) and the
    other ranks after it, so that one process per node fetches the file rather than all at once."""
    if not downloads or not initialized():
        return load()
    if dist.get_rank() != 0:
        barrier()
    result = load()
    if dist.get_rank() == 0:
        barrier()
    return result
