"""Training and distillation on a CUDA GPU, end to end (marked `gpu`: skipped without one).

DALI decodes on the GPU, the step loop runs with `runtime.sync_debug` (a host sync inside a
step raises), and each run is stopped after a few steps and resumed.
"""

from __future__ import annotations

import pytest
import torch

from fastkd import commands, loop
from fastkd.checkpoint import load_checkpoint
from fastkd.config import config_from_dict
from tests.conftest import backend_data, distill_dict, stop_after, tiny_config_dict

pytestmark = pytest.mark.gpu

GPU_RUNTIME = {"device": "cuda", "deterministic": False, "sync_debug": True}
# A gentler recipe than the CPU tests' (lr 0.05 reached a val loss in the thousands on the
# H200 in fp32), clipped: clipping also runs the GradScaler's unscale_ inside the sync check.
# The fp16 case caught fused SGD's uninitialized momentum after skipped steps (fastkd.optim).
GPU_OPTIM = {"lr": 0.01, "grad_clip_norm": 5.0}


def stop_then_resume(monkeypatch, raw: dict, run, stop_step: int) -> dict:
    cfg = config_from_dict(raw)
    with monkeypatch.context() as patch:
        stop_after(patch, stop_step)
        with pytest.raises(loop.Interrupted):
            run(cfg, progress=False)
    assert load_checkpoint(cfg.run_dir / "last.pt")["step"] == stop_step
    return run(cfg, resume=True, progress=False).summary


@pytest.mark.parametrize("precision, dali_device", [("fp16", "gpu"), ("bf16", "cpu")])
def test_train_on_the_gpu_stops_and_resumes(tiny_imagefolder, tmp_path, monkeypatch, precision, dali_device):
    pytest.importorskip("nvidia.dali")
    raw = tiny_config_dict(tiny_imagefolder, tmp_path / "runs", data=backend_data("dali", device=dali_device),
                           runtime={**GPU_RUNTIME, "precision": precision}, optim=GPU_OPTIM)
    summary = stop_then_resume(monkeypatch, raw, commands.train, stop_step=3)
    assert summary["steps"] == 10 and summary["precision"] == precision
    assert summary["device"] == torch.cuda.get_device_name(0)
    checkpoint = load_checkpoint(tmp_path / "runs" / "tiny" / "last.pt")
    assert bool(checkpoint["scaler"]) == (precision == "fp16")
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("teacher_precision, side_stream", [("fp32", True), (None, False)])
def test_distill_on_the_gpu_stops_and_resumes(tiny_imagefolder, tmp_path, monkeypatch, teacher_precision,
                                              side_stream):
    pytest.importorskip("nvidia.dali")
    teacher_raw = tiny_config_dict(tiny_imagefolder, tmp_path / "runs", run={"name": "teacher"},
                                   optim={**GPU_OPTIM, "epochs": 1, "warmup_epochs": 0},
                                   runtime={**GPU_RUNTIME, "precision": "bf16"})
    teacher = commands.train(config_from_dict(teacher_raw), progress=False).run_dir / "best.pt"
    raw = distill_dict(tiny_imagefolder, tmp_path / "runs", teacher, side_stream=side_stream)
    raw["distill"]["teacher"]["precision"] = teacher_precision  # fp32 teacher fed fp16 DALI batches
    raw["data"].update(backend_data("dali", device="gpu"))
    raw["runtime"] = {**GPU_RUNTIME, "precision": "bf16"}
    raw["optim"].update(GPU_OPTIM)
    summary = stop_then_resume(monkeypatch, raw, commands.distill, stop_step=6)
    assert summary["steps"] == 10 and summary["teacher"]["precision"] == (teacher_precision or "bf16")
