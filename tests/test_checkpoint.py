from __future__ import annotations

import os

import pytest
import torch
import torchvision

from fastkd.checkpoint import copy_checkpoint, load_checkpoint, save_checkpoint
from fastkd.errors import CheckpointError


def test_round_trip_keeps_tensors_and_plain_values(tmp_path):
    path = tmp_path / "c.pt"
    model = torchvision.models.resnet18(num_classes=3)
    save_checkpoint(path, {"model": model.state_dict(), "classes": ["a", "b", "c"], "epoch": 4, "best_top1": 12.5})
    payload = load_checkpoint(path)
    assert payload["classes"] == ["a", "b", "c"] and payload["epoch"] == 4
    fresh = torchvision.models.resnet18(num_classes=3)
    fresh.load_state_dict(payload["model"], strict=True)
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary file left behind"


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1})

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="could not write checkpoint .*last.pt: No space left on device; "
                                              "the previous checkpoint is intact"):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_copy_is_atomic_and_complete(tmp_path):
    save_checkpoint(tmp_path / "last.pt", {"epoch": 3})
    copy_checkpoint(tmp_path / "last.pt", tmp_path / "best.pt")
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 3


def test_missing_truncated_and_foreign_files_are_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*none.pt"):
        load_checkpoint(tmp_path / "none.pt")
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"model": {"w": torch.ones(1000)}})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: os.path.getsize(good) // 2])
    with pytest.raises(CheckpointError, match="checkpoint is corrupt, truncated or not a PyTorch file: .*truncated.pt"):
        load_checkpoint(truncated)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="corrupt, truncated or not a PyTorch file"):
        load_checkpoint(text)


class Payload:
    """Any class outside torch's allow-list."""


def test_loading_never_unpickles_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": Payload()}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
