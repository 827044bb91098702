"""Device, process-group and precision resolution, with CUDA simulated; AMP paths on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from fastkd import commands
from fastkd.distributed import process_group
from fastkd.checkpoint import load_checkpoint
from fastkd.config import RuntimeConfig
from fastkd.errors import ConfigError
from fastkd.loop import apply_update, backward
from fastkd.runtime import Runtime, create_runtime, resolve_device
from pipelines import loader_workers
from pipelines.base import Shard
from tests.conftest import distill_dict, tiny_config, write_config


@pytest.fixture
def two_gpus(monkeypatch):
    """A host that reports two CUDA GPUs (nothing touches them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def cpu_runtime(**kw) -> Runtime:
    values = dict(device=torch.device("cpu"), precision="fp32", channels_last=True, compile=False, sync_bn=False,
                  shard=Shard())
    values.update(kw)
    return Runtime(**values)


def test_each_local_process_gets_its_own_gpu(two_gpus):
    assert resolve_device("auto", Shard(local_rank=1, local_world_size=2)) == torch.device("cuda", 1)
    assert resolve_device("cuda", Shard(local_rank=0, local_world_size=2)) == torch.device("cuda", 0)
    assert resolve_device("cpu", Shard(local_rank=1, local_world_size=2)) == torch.device("cpu")


def test_more_local_processes_than_gpus_is_a_one_line_error(two_gpus):
    with pytest.raises(ConfigError, match=r"runtime.device: 3 CUDA processes on this node but 2 GPU\(s\) visible"):
        resolve_device("auto", Shard(rank=2, world_size=3, local_rank=2, local_world_size=3))


def test_a_process_given_one_gpu_by_cuda_visible_devices_uses_device_0(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    assert resolve_device("auto", Shard(rank=5, world_size=8, local_rank=5, local_world_size=8)) == \
        torch.device("cuda", 0)


def test_cuda_requested_without_a_gpu_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="runtime.device: cuda requested but no CUDA GPU is available"):
        resolve_device("cuda", Shard())


def test_process_group_backend_follows_the_runtime_device_not_the_host(two_gpus, monkeypatch):
    """CPU processes on a GPU host (runtime.device: cpu) must use gloo: NCCL cannot reduce CPU tensors."""
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: None)
    cpu = create_runtime(RuntimeConfig(device="cpu"), Shard(rank=0, world_size=2, local_world_size=2))
    gpu = cpu_runtime(device=torch.device("cuda", 1), precision="bf16")
    for runtime in (cpu, gpu):
        with process_group(2, runtime):
            pass
    assert [c["backend"] for c in calls] == ["gloo", "nccl"]
    assert calls[0]["device_id"] is None and calls[1]["device_id"] == torch.device("cuda", 1)


def test_loader_threads_split_the_nodes_cores_between_its_processes(monkeypatch):
    monkeypatch.setattr("pipelines.loaders.cpu_count", lambda: 64)
    assert loader_workers(None, Shard(local_world_size=8), dali=True) == 8
    assert loader_workers(None, Shard(), dali=True) == 8  # capped: threads hold decoder buffers
    assert loader_workers(None, Shard(local_world_size=16), dali=True) == 4
    assert loader_workers(None, Shard()) == 64  # DataLoader workers: every core
    assert loader_workers(3, Shard(local_world_size=8), dali=True) == 3  # data.num_workers wins
    monkeypatch.setattr("pipelines.loaders.cpu_count", lambda: 2)
    assert loader_workers(None, Shard(local_world_size=4), dali=True) == 1


def test_half_batches_are_cast_only_for_fp32_models():
    assert Runtime.input_dtype("fp32") == torch.float32
    assert Runtime.input_dtype("bf16") is None and Runtime.input_dtype("fp16") is None


def test_reduced_precision_on_a_gpu_hands_over_half_batches():
    gpu = cpu_runtime(device=torch.device("cuda", 0), precision="bf16")
    assert gpu.batch_spec.dtype == torch.float16 and gpu.batch_spec.memory_format == torch.channels_last
    assert cpu_runtime(precision="bf16").batch_spec.dtype == torch.float32


def test_sync_debug_leaves_the_sync_mode_alone_off_the_gpu(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: calls.append("get") or 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda m: calls.append(m))
    with cpu_runtime(sync_debug=True).no_host_sync():
        torch.zeros(1).item()  # a host read on the CPU is no sync to report
    assert calls == []


def test_sync_debug_makes_host_syncs_errors_inside_the_block_on_a_gpu(monkeypatch):
    mode = ["default"]
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: {"default": 0, "error": 2}[mode[0]])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda m: mode.__setitem__(0, {0: "default"}.get(m, m)))
    gpu = cpu_runtime(device=torch.device("cuda", 0), precision="bf16", sync_debug=True)
    with gpu.no_host_sync():
        assert mode[0] == "error"
    assert mode[0] == "default"
    with cpu_runtime(device=torch.device("cuda", 0), precision="bf16").no_host_sync():  # off unless asked
        assert mode[0] == "default"


def test_the_training_step_runs_inside_the_sync_check(tiny_imagefolder, tmp_path, monkeypatch):
    import contextlib

    from fastkd.steps import ClassificationStep

    inside, seen = [False], []

    @contextlib.contextmanager
    def recording(self):
        inside[0] = True
        try:
            yield
        finally:
            inside[0] = False

    original = ClassificationStep.forward

    def forward(self, batch):
        seen.append(inside[0])
        return original(self, batch)

    monkeypatch.setattr(Runtime, "no_host_sync", recording)
    monkeypatch.setattr(ClassificationStep, "forward", forward)
    commands.train(tiny_config(tiny_imagefolder, tmp_path / "runs", optim={"epochs": 1, "warmup_epochs": 0}),
                 progress=False)
    assert seen == [True] * 5


def test_sync_debug_with_sync_batchnorm_is_refused():
    from fastkd.config import config_from_dict

    with pytest.raises(ConfigError, match="runtime.sync_debug: SyncBatchNorm synchronizes"):
        config_from_dict({"data": {"backend": "synthetic"}, "runtime": {"sync_debug": True, "sync_bn": True}})


@pytest.mark.gpu
def test_a_host_sync_inside_the_block_raises_on_a_gpu():
    runtime = create_runtime(RuntimeConfig(device="cuda", sync_debug=True), Shard())
    with pytest.raises(RuntimeError, match="called a synchronizing CUDA operation"):
        with runtime.no_host_sync():
            torch.ones(1, device="cuda").item()
    torch.ones(1, device="cuda").item()  # and the mode is restored after


def test_fp16_grad_scaler_skips_non_finite_steps_and_backs_off():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = cpu_runtime(precision="fp16").create_scaler()
    assert scaler.is_enabled() and scaler.get_scale() == 2.0**16
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    backward(model(torch.randn(3, 4)).sum() * float("inf"), optimizer, scaler)
    apply_update(optimizer, scaler, params, grad_clip_norm=1.0)
    assert all(torch.equal(a, p) for a, p in zip(before, params))  # skipped
    assert scaler.get_scale() == 2.0**15  # backed off
    backward(model(torch.randn(3, 4)).sum(), optimizer, scaler)
    apply_update(optimizer, scaler, params, grad_clip_norm=None)
    assert not all(torch.equal(a, p) for a, p in zip(before, params))
    assert not cpu_runtime(precision="bf16").create_scaler().is_enabled()


@pytest.mark.slow
def test_bf16_training_and_distillation_run_on_the_cpu(tiny_imagefolder, tiny_teacher, tmp_path):  # noqa: F811
    cfg = tiny_config(tiny_imagefolder, tmp_path / "runs", optim={"epochs": 1, "warmup_epochs": 0},
                      runtime={"device": "cpu", "precision": "bf16", "deterministic": False})
    summary = commands.train(cfg, progress=False).summary
    assert summary["precision"] == "bf16" and summary["steps"] == 5
    raw = distill_dict(tiny_imagefolder, tmp_path / "runs", tiny_teacher)
    raw["run"]["name"] = "kd-bf16"
    raw["optim"] = {"epochs": 1, "warmup_epochs": 0}
    raw["runtime"] = {"device": "cpu", "precision": "bf16"}
    raw["distill"]["teacher"]["precision"] = "fp32"
    from fastkd.config import load_config

    result = commands.distill(load_config(write_config(tmp_path / "kd.yaml", raw)), progress=False)
    assert result.summary["teacher"]["precision"] == "fp32" and result.summary["steps"] == 5
    checkpoint = load_checkpoint(result.run_dir / "last.pt")
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())


def test_runtime_threads_set_the_runs_torch_threads_and_null_keeps_the_starting_count(tiny_imagefolder, tmp_path,
                                                                                       monkeypatch):
    import json

    from fastkd import runtime as runtime_module
    from fastkd.config import config_from_dict

    monkeypatch.setattr(runtime_module, "STARTING_THREADS", 2)  # as on a machine of 2 cores or more
    cfg = tiny_config(tiny_imagefolder, tmp_path / "runs", optim={"epochs": 1, "warmup_epochs": 0},
                      runtime={"device": "cpu", "threads": 3})  # neither the machine's count nor the patched one
    run_dir = commands.train(cfg, progress=False).run_dir
    assert torch.get_num_threads() == 3
    assert json.loads((run_dir / "env.json").read_text())["torch_threads"] == 3  # recorded with the run
    from fastkd.engine import build_run

    build_run(tiny_config(tiny_imagefolder, tmp_path / "runs", runtime={"device": "cpu"}),
              create_runtime(RuntimeConfig(device="cpu")), student="untrained")
    assert torch.get_num_threads() == 2  # null: the count the process started with, not the last run's
    with pytest.raises(ConfigError, match=r"runtime.threads: must be >= 1 or null, got 0"):
        config_from_dict({"data": {"backend": "synthetic"}, "runtime": {"threads": 0}})
