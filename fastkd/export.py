"""`fastkd export RUN_DIR --out student.pt [--onnx]`: the student alone, for deployment.

Writes `student.pt` (a plain state_dict: `torchvision.models.<arch>(num_classes=N)` or, for
`timm:<name>`, `timm.create_model(name, num_classes=N)` then `.load_state_dict(torch.load(path))`
works as is), `student.json` (arch, class names in label order, input size and the input
normalization the weights expect) and, with `--onnx`, `student.onnx`, checked against
PyTorch on a sample batch with onnxruntime.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from fastkd.checkpoint import is_fastkd_checkpoint, load_checkpoint
from fastkd.config import config_from_dict, upgrade_saved_config
from fastkd.errors import CheckpointError, FastkdError
from fastkd.models import create_model, load_weights
from pipelines.base import IMAGENET_MEAN, IMAGENET_STD

ONNX_TOLERANCE = 1e-3


ONNX_HINT = ("--onnx needs the onnx and onnxruntime packages: pip install onnx onnxruntime (in a checkout of "
             "fastkd: pip install -e '.[onnx]'; from a package: pip install 'fastkd[onnx]')")


def export_student(run_dir: Path, out: Path, *, checkpoint: str = "best", onnx: bool = False) -> dict[str, Any]:
    """Writes OUT, OUT.json (and OUT.onnx) only once each of them is ready and checked: a refused
    export writes nothing (the files are made in a temporary folder and moved into place)."""
    if onnx:
        missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
        if missing:
            raise FastkdError(f"{ONNX_HINT} ({' and '.join(missing)} not installed)")
    if out.is_dir():
        raise FastkdError(f"--out {out}: a folder; name the state_dict file to write, e.g. {out / 'student.pt'}")
    path = run_dir / {"best": "best.pt", "last": "last.pt", "best-ema": "best_ema.pt"}[checkpoint]
    payload = load_checkpoint(path, key="RUN_DIR" if checkpoint == "best" else f"--checkpoint {checkpoint}")
    if not is_fastkd_checkpoint(payload):
        raise CheckpointError(f"{path} is not a fastkd checkpoint")
    weights = payload["model"]
    best_top1 = payload["best_top1"]
    if checkpoint == "best-ema":  # the EMA weights of the epoch where they tested best
        weights, best_top1 = payload["ema"], payload["state"]["best_ema_top1"]
    data = config_from_dict(upgrade_saved_config(payload["config"])).data
    image_size = data.val_crop_size  # what the model was tested at (a run may train lower: a size schedule)
    model = create_model(payload["arch"], payload["num_classes"], image_size=data.image_size)
    load_weights(model, weights, source=path, arch=payload["arch"], num_classes=payload["num_classes"])
    model.eval()
    meta = {"arch": payload["arch"], "num_classes": payload["num_classes"], "classes": list(payload["classes"]),
            "image_size": image_size, "resize": data.val_resize_size,
            **(payload.get("normalization") or {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}),
            "source": str(path), "weights": "ema" if checkpoint == "best-ema" else "model", "epoch": payload["epoch"],
            "best_top1": best_top1}
    targets = [out, out.with_suffix(".json")] + ([out.with_suffix(".onnx")] if onnx else [])
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fastkd-export-", dir=out.parent))  # same filesystem: renames
    try:
        staged = [staging / target.name for target in targets]
        torch.save(model.state_dict(), staged[0])
        if onnx:
            meta["onnx_max_abs_diff"] = export_onnx(model, staged[2], image_size, name=targets[2])
        staged[1].write_text(json.dumps(meta, indent=2) + "\n")
        for source, target in zip(staged, targets):
            os.replace(source, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:  # innermost first: only the folders this export made, if still empty
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return meta


def export_onnx(model: torch.nn.Module, path: Path, image_size: int, *, name: Path | None = None) -> float:
    """Write ONNX with a dynamic batch axis; return the largest |difference| from PyTorch (an
    error names the file as `name`, where it would have gone, if given)."""
    try:
        import onnxruntime
    except ImportError:
        raise FastkdError(ONNX_HINT) from None
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
        raise FastkdError(f"{name or path}: ONNX output differs from PyTorch by {difference:.2e} (> {ONNX_TOLERANCE})")
    return difference
