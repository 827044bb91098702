"""How many loader workers or DALI threads a process runs (`fastkd.data` builds the loaders)."""

from __future__ import annotations

from fastkd.env import cpu_count
from pipelines.base import Shard

# DALI threads per process unless data.num_workers says otherwise: beyond this a pipeline stops
# gaining, while each thread holds its own decoder buffers (host and, for nvJPEG, device memory).
MAX_DEFAULT_DALI_THREADS = 8


def loader_workers(num_workers: int | None, shard: Shard, *, dali: bool = False) -> int:
    """DataLoader workers or DALI threads of one process: `num_workers`, or this process's share
    of the node's cores (the node's processes split them), at most 8 DALI threads."""
    if num_workers is not None:
        return num_workers
    share = max(1, cpu_count() // max(1, shard.local_world_size))
    return min(share, MAX_DEFAULT_DALI_THREADS) if dali else share
