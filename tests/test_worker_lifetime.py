"""Worker processes end with the process that started them, even when it dies by SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, backend_data, hooked_env, tiny_config_dict, wait_for, write_config

# A process that starts one worker (forked, or spawned and handed a pickled TrainSamples that it
# unpickles once started, as DALI's spawned workers load their source), prints the worker's pid,
# then waits to be killed.
PARENT = textwrap.dedent("""
    import multiprocessing, pickle, signal, sys, time
    from pipelines.augment import SizeSchedule
    from pipelines.dali_source import TrainSamples
    from pipelines.worker_lifetime import workers_die_with_this_process

    def work(pickled=None):
        if pickled is not None:
            pickle.loads(pickled)
        open(f"{sys.argv[2]}/ready", "w").close()  # the worker has started (and unpickled its source)
        time.sleep(60)

    if __name__ == "__main__":
        how = sys.argv[1]
        for signum in (signal.SIGINT, signal.SIGTERM):  # as the trainer's stop handler: a forked worker inherits it
            signal.signal(signum, lambda *_: None)
        if how == "spawn":
            source = TrainSamples(["a.jpg"], [0], seed=0, rank=0, world_size=1, batch_size=1, sizes=SizeSchedule(32))
            worker = multiprocessing.get_context("spawn").Process(target=work, args=(pickle.dumps(source),),
                                                                  daemon=True)
            worker.start()
        else:
            worker = multiprocessing.get_context("fork").Process(target=work, daemon=True)
            if how == "fork":
                with workers_die_with_this_process():
                    worker.start()
            else:  # "fork, unguarded": a worker started outside the block, as before the fix
                worker.start()
        print(worker.pid, flush=True)
        time.sleep(60)
""")


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None


def children_of(pid: int) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and parent_of(int(p.name)) == pid]


def gone_within(pids: list[int], seconds: float) -> list[int]:
    """The pids still alive (not zombies of a reaped parent) after up to `seconds`."""
    deadline = time.time() + seconds
    while True:
        alive = [pid for pid in pids if Path(f"/proc/{pid}").exists()
                 and " Z " not in Path(f"/proc/{pid}/stat").read_text()[:60]]
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.1)


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@pytest.mark.parametrize("how", ["fork", "spawn", "fork, unguarded"])
def test_a_worker_ends_when_its_parent_is_killed_with_sigkill(tmp_path, how):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script), how, str(tmp_path)], cwd=REPO, env=hooked_env(),
                              stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    try:
        assert parent_of(worker) == parent.pid
        parent.kill()
        parent.wait()
        alive = gone_within([worker], 5)
        if how == "fork, unguarded":  # the test can tell: without the guard the worker lives on
            assert alive == [worker]
        else:
            assert alive == [], f"{how} worker {worker} outlived its parent"
    finally:
        kill_all([worker])


@pytest.mark.parametrize("how", ["fork", "spawn"])
def test_a_worker_ignores_ctrl_c_and_ends_on_sigterm(tmp_path, how):
    """Ctrl-C reaches the whole foreground group: a worker ignores it (its trainer finishes the
    step and closes the pool). SIGTERM ends a worker, though a forked one inherits the trainer's
    stop handler, which would otherwise swallow it (DALI's pool terminates a worker with it)."""
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script), how, str(tmp_path)], cwd=REPO, env=hooked_env(),
                              stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    try:
        deadline = time.time() + 60
        while not (tmp_path / "ready").exists():  # a spawned worker sets its handlers as it unpickles its source
            assert time.time() < deadline and parent_of(worker) == parent.pid, "the worker never started"
            time.sleep(0.05)
        os.kill(worker, signal.SIGINT)
        assert gone_within([worker], 1.0) == [worker], f"{how} worker died of SIGINT"
        os.kill(worker, signal.SIGTERM)
        assert gone_within([worker], 5.0) == [], f"{how} worker outlived SIGTERM"
    finally:
        parent.kill()
        parent.wait()
        kill_all([worker])


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_kill_9_of_a_trainer_leaves_no_process_behind(tiny_imagefolder, tmp_path, backend):
    """The trainer with its data workers (DALI's Python source workers; DataLoader workers) is
    killed with SIGKILL mid-run: every process it had started is gone within seconds. (torch's
    DataLoader workers watch their parent themselves: that case guards against a regression, the
    DALI case fails without `pipelines.worker_lifetime`.)"""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    raw = tiny_config_dict(tiny_imagefolder, tmp_path / "runs", run={"checkpoint_every_steps": 1},
                           data={**backend_data(backend), "num_workers": 2}, optim={"epochs": 3})
    trainer = subprocess.Popen([sys.executable, str(REPO / "tests" / "fastkd_with_hooks.py"), "train", "--config",
                                str(write_config(tmp_path / "c.yaml", raw)), "--no-progress"], cwd=REPO,
                               env=hooked_env(step_delay="0.3"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    children: list[int] = []
    try:
        wait_for(tmp_path / "runs" / "tiny" / "last.pt", trainer)
        children = children_of(trainer.pid)
        assert children, "the trainer started no worker: nothing tested"
        trainer.kill()
        trainer.wait()
        assert gone_within(children, 10) == [], f"{backend}: workers outlived the trainer"
    finally:
        trainer.kill()
        kill_all(children)
