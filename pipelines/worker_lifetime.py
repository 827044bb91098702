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
from typing import Any, Iterator

PR_SET_PDEATHSIG = 1
"""prctl(2): the signal this process gets when the thread that created it exits."""
POLL_SECONDS = 0.25


def _find_prctl() -> Any:
    """libc's prctl, looked up once in the parent: a child of a multi-threaded process should not
    take the dynamic loader's lock between fork and its first step."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _find_prctl()

_starting: int | None = None
"""While a block of `workers_die_with_this_process` runs: this process's pid."""
_forked_by_main_thread = True
"""Whether the thread that called the latest fork is the main thread, which lives as long as the
process (set in the parent just before each fork, read in the child)."""


@contextlib.contextmanager
def workers_die_with_this_process() -> Iterator[None]:
    """Processes forked within this block end when this process dies, by any signal."""
    global _starting
    outer = _starting
    _starting = os.getpid()
    try:
        yield
    finally:
        _starting = outer


def _set_parent_death_signal() -> bool:
    """SIGKILL this process when its parent's creating thread exits (Linux); False where unsupported."""
    return _PRCTL is not None and _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_SECONDS)
    os._exit(1)


def die_with_parent(parent: int, *, parent_thread_lives: bool = True) -> None:
    """In a worker: end when process `parent` ends. The kernel's parent-death signal follows the
    parent's *thread* that started this process, so it is used only when that thread lives as
    long as its process (the main thread); otherwise a daemon thread polls. Checked once more
    afterwards: a parent that died before the signal was set is not missed.

    The worker also leaves stopping to its trainer: Ctrl-C, which a terminal sends to every
    process of the foreground group, is ignored (the trainer finishes its step and closes the
    pool), and SIGTERM ends it as it ends any process (DALI's pool terminates a worker that does
    not exit, and a forked worker would otherwise keep the trainer's stop handler)."""
    if not (parent_thread_lives and _set_parent_death_signal()):
        threading.Thread(target=_watch, args=(parent,), name="fastkd-parent-watch", daemon=True).start()
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except ValueError:  # not the worker's main thread: its handlers stay as they are
        pass
    if os.getppid() != parent:
        os._exit(1)


def _before_fork() -> None:
    global _forked_by_main_thread
    _forked_by_main_thread = threading.current_thread() is threading.main_thread()


def _after_fork_in_child() -> None:
    global _starting
    if _starting is None:
        return
    parent = _starting
    _starting = None  # the worker's own children are its business
    die_with_parent(parent, parent_thread_lives=_forked_by_main_thread)


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
