"""`fastkd` with test hooks, for tests that run it in other processes (plain or under torchrun).

The hooks make timing-dependent events happen at a chosen point instead of by luck:

- FASTKD_TEST_STEP_DELAY=SECONDS: sleep after every optimizer step, and after every batch a
  teacher-cache recording writes (a run long enough to be signalled before it ends).
- FASTKD_TEST_STOP_AT=RANK:STEP: request a stop on rank RANK only, right after step STEP (as a
  signal reaching one process of a job would).
- FASTKD_TEST_KILL_IN_WRITE=N: SIGKILL this process during its N-th checkpoint write, after the
  temporary file is written and before it is renamed into place.
- FASTKD_TEST_KILL_AFTER_WRITE=N: SIGKILL this process right after its N-th checkpoint write.
- FASTKD_TEST_CACHE_ON_RANK_0_ONLY=1: on every rank but 0, opening a teacher cache's folder is an
  error (as on a node that does not see rank 0's disk).

Usage: python tests/fastkd_with_hooks.py train --config ...   (the arguments of `fastkd`).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastkd import checkpoint, loop, teacher_cache, teacher_cache_recorder  # noqa: E402
from fastkd.cli import main  # noqa: E402


def install_hooks() -> None:
    delay = float(os.environ.get("FASTKD_TEST_STEP_DELAY", 0))
    stop_rank, _, stop_step = os.environ.get("FASTKD_TEST_STOP_AT", "").partition(":")
    rank = int(os.environ.get("RANK", 0))
    agree_to_stop = loop.agree_to_stop

    def hooked_agree_to_stop(t: loop.Training) -> bool:
        if delay:
            time.sleep(delay)
        if stop_step and rank == int(stop_rank) and t.state.step == int(stop_step):
            t.stop.signum = signal.SIGTERM
        return agree_to_stop(t)

    loop.agree_to_stop = hooked_agree_to_stop
    agree_to_stop_recording = teacher_cache_recorder.agree_to_stop

    def hooked_agree_to_stop_recording(stop: loop.StopFlag, runtime) -> bool:
        if delay:
            time.sleep(delay)
        return agree_to_stop_recording(stop, runtime)

    teacher_cache_recorder.agree_to_stop = hooked_agree_to_stop_recording

    kill_in = int(os.environ.get("FASTKD_TEST_KILL_IN_WRITE", 0))
    kill_after = int(os.environ.get("FASTKD_TEST_KILL_AFTER_WRITE", 0))
    writes = {"n": 0}
    replace = os.replace

    def hooked_replace(source, target):  # checkpoint.py renames each finished temporary file
        if str(source).endswith(f".tmp-{os.getpid()}"):
            writes["n"] += 1
            if writes["n"] == kill_in:
                os.kill(os.getpid(), signal.SIGKILL)
            replace(source, target)
            if writes["n"] == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            return
        replace(source, target)

    checkpoint.os.replace = hooked_replace  # type: ignore[attr-defined]

    if os.environ.get("FASTKD_TEST_CACHE_ON_RANK_0_ONLY") == "1" and rank != 0:
        def unreachable(*args, **kwargs):
            raise RuntimeError(f"rank {rank} opened the teacher cache's folder: only rank 0 may")

        teacher_cache._read_manifest = unreachable
        teacher_cache.TeacherCache.create_or_resume = classmethod(unreachable)  # type: ignore[method-assign]


if __name__ == "__main__":
    install_hooks()
    main()
