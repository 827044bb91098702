"""On-device meters (read only at log intervals), metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """Number of samples whose label is among the top-k logits, for each k (on device)."""
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices
    hits = top.eq(labels.unsqueeze(1))
    return torch.stack([hits[:, :min(k, k_max)].any(dim=1).sum() for k in ks])


class Meter:
    """Running sums of per-batch values, kept on the device.

    `update` adds per-batch sums without any host sync; `compute` (one sync) returns means.
    """

    def __init__(self, device: torch.device, names: tuple[str, ...] = ()):
        self.device = device
        self.names: list[str] = list(names)
        self.totals: torch.Tensor | None = torch.zeros(len(names), dtype=torch.float64, device=device) if names else None
        self.count = 0  # samples; batch sizes are known on the host, so no sync is needed

    def update(self, batch_size: int, sums: dict[str, torch.Tensor]) -> None:
        values = torch.stack([v.detach().to(torch.float64) for v in sums.values()])
        if self.totals is None:
            self.names = list(sums)
            self.totals = torch.zeros_like(values)
        self.totals += values
        self.count += batch_size

    def all_reduce(self) -> None:
        """Sum over every process (call on all ranks)."""
        if not (dist.is_available() and dist.is_initialized()) or self.totals is None:
            return
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.totals.device)
        both = torch.cat([self.totals, count])
        dist.all_reduce(both)
        self.totals, self.count = both[:-1], int(both[-1].item())  # host sync: epoch boundary

    def compute(self) -> dict[str, float]:
        if self.totals is None or self.count == 0:
            return {}
        totals = self.totals.tolist()  # host sync: only at log intervals and epoch ends
        return {name: total / self.count for name, total in zip(self.names, totals)}

    def state_dict(self) -> dict[str, Any]:
        totals = None if self.totals is None else self.totals.cpu()  # host sync: checkpoints only
        return {"names": self.names, "totals": totals, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.names = list(state["names"])
        self.totals = None if state["totals"] is None else state["totals"].to(self.device)
        self.count = int(state["count"])


class NonFiniteGuard:
    """Remembers, on the device, the first optimizer step whose loss was not finite."""

    def __init__(self, device: torch.device, first_step: int = 0):
        # Two scalars filled on the device (no host-to-device copy), once per epoch.
        self._step = torch.full((), first_step, dtype=torch.int64, device=device)
        self._first_bad = torch.full((), -1, dtype=torch.int64, device=device)

    def observe(self, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach())
        self._first_bad = torch.where(bad & (self._first_bad < 0), self._step, self._first_bad)
        self._step += 1

    def first_bad_step(self) -> int | None:
        first = self._first_bad
        if dist.is_available() and dist.is_initialized():
            never = torch.iinfo(torch.int64).max
            first = torch.where(first < 0, torch.full_like(first, never), first)
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
            first = torch.where(first == never, torch.full_like(first, -1), first)
        value = int(first.item())  # host sync: log intervals and before checkpoints only
        return None if value < 0 else value


def percent(fraction: float) -> float:
    return round(100.0 * fraction, 4)


class RunLogger:
    """metrics.jsonl (one line per epoch) and TensorBoard scalars; a no-op on non-main ranks."""

    def __init__(self, run_dir: Path, *, tensorboard: bool, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def truncate_after(self, epoch: int) -> None:
        """On resume: drop lines of epochs past the checkpoint, so none is written twice."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("epoch", 0) <= epoch]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log_epoch(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
        self.log_scalars(record["step"], {k: v for k, v in record.items()
                                          if k not in ("epoch", "step") and isinstance(v, (int, float))},
                         prefix="epoch/")

    def log_scalars(self, step: int, scalars: dict[str, float], prefix: str = "") -> None:
        if self._writer is None:
            return
        for name, value in scalars.items():
            if value is not None and math.isfinite(value):
                self._writer.add_scalar(prefix + name, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
