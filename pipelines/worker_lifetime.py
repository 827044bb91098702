"""Worker processes end with the process that started them, however it dies.

torch's DataLoader workers watch their parent and exit when it is gone. DALI's parallel external
source workers (started by `pipe.build()`, forked on the CPU, spawned with a GPU) do not: after a
`kill -9` of a trainer they lived on under init (about 415 MB each), ignoring SIGTERM (a forked
worker inherits the trainer's stop handler), and kept alive the multiprocessing helpers whose
pipes they had inherited. A trainer killed by SIGKILL runs no code, so the workers must watch:
each asks the kernel for SIGKILL when its parent dies (Linux `PR_SET_PDEATHSIG`), or, where that
cannot apply, polls its parent from a daemon thread; either way, a worker whose parent is already
gone exits at once.

    with workers_die_with_this_process():
        pipe.build()                      # forked workers: set up in the child right after fork

Spawned workers set themselves up when they unpickle their source (`die_with_parent`, called
from `pipelines.dali_source.TrainSamples.__setstate__`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from typing import Iterator

PR_SET_PDEATHSIG = 1
"""prctl(2): the signal this process gets when the thread that created it exits."""
POLL_SECONDS = 0.25

_starting: tuple[int, bool] | None = None
"""While a block of `workers_die_with_this_process` runs: (this process's pid, whether the
thread starting the workers is the main thread, which lives as long as the process)."""


@contextlib.contextmanager
def workers_die_with_this_process() -> Iterator[None]:
    """Processes forked within this block end when this process dies, by any signal."""
    global _starting
    outer = _starting
    _starting = (os.getpid(), threading.current_thread() is threading.main_thread())
    try:
        yield
    finally:
        _starting = outer


def _set_parent_death_signal() -> bool:
    """SIGKILL this process when its parent's creating thread exits (Linux); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_SECONDS)
    os._exit(1)


def die_with_parent(parent: int, *, parent_thread_lives: bool = True) -> None:
    """In a worker: end when process `parent` ends. The kernel's parent-death signal follows the
    parent's *thread* that started this process, so it is used only when that thread lives as
    long as its process (the main thread); otherwise a daemon thread polls. Checked once more
    afterwards: a parent that died before the signal was set is not missed."""
    if not (parent_thread_lives and _set_parent_death_signal()):
        threading.Thread(target=_watch, args=(parent,), name="fastkd-parent-watch", daemon=True).start()
    if os.getppid() != parent:
        os._exit(1)


def _after_fork_in_child() -> None:
    global _starting
    if _starting is None:
        return
    parent, main_thread = _starting
    _starting = None  # the worker's own children are its business
    die_with_parent(parent, parent_thread_lives=main_thread)


os.register_at_fork(after_in_child=_after_fork_in_child)
