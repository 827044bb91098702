"""`fastkd export RUN_DIR --out student.pt [--onnx]`: the student alone, for deployment.

Writes `student.pt` (a plain torchvision state_dict: `torchvision.models.<arch>(num_classes=N)
.load_state_dict(torch.load(path))` works as is), `student.json` (arch, class names in label
order, input size and normalization) and, with `--onnx`, `student.onnx`, checked against
PyTorch on a sample batch with onnxruntime.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from fastkd.checkpoint import is_fastkd_checkpoint, load_checkpoint
from fastkd.config import config_from_dict
from fastkd.errors import CheckpointError, FastkdError
from fastkd.models import create_model, load_weights
from pipelines.base import IMAGENET_MEAN, IMAGENET_STD

ONNX_TOLERANCE = 1e-3


def export_student(run_dir: Path, out: Path, *, checkpoint: str = "best", onnx: bool = False) -> dict[str, Any]:
    path = run_dir / f"{checkpoint}.pt"
    payload = load_checkpoint(path)
    if not is_fastkd_checkpoint(payload):
        raise CheckpointError(f"{path} is not a fastkd checkpoint")
    data = config_from_dict(payload["config"]).data
    image_size = data.val_crop_size  # what the model was tested at (a run may train lower: a size schedule)
    model = create_model(payload["arch"], payload["num_classes"], image_size=data.image_size)
    load_weights(model, payload["model"], source=path, arch=payload["arch"], num_classes=payload["num_classes"])
    model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    meta = {"arch": payload["arch"], "num_classes": payload["num_classes"], "classes": list(payload["classes"]),
            "image_size": image_size, "resize": data.val_resize_size, "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "source": str(path), "epoch": payload["epoch"], "best_top1": payload["best_top1"]}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    if onnx:
        meta["onnx_max_abs_diff"] = export_onnx(model, out.with_suffix(".onnx"), image_size)
    return meta


def export_onnx(model: torch.nn.Module, path: Path, image_size: int) -> float:
    """Write ONNX with a dynamic batch axis; return the largest |difference| from PyTorch."""
    try:
        import onnxruntime
    except ImportError:
        raise FastkdError("--onnx needs onnx and onnxruntime: pip install 'fastkd[onnx]'") from None
    sample = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (sample,), str(path), input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    check = torch.randn(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": check.numpy()})[0])
    with torch.no_grad():
        expected = model(check)
    difference = float((got - expected).abs().max())
    if difference > ONNX_TOLERANCE:
        raise FastkdError(f"{path}: ONNX output differs from PyTorch by {difference:.2e} (> {ONNX_TOLERANCE})")
    return difference
