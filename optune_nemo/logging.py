"""Rank-aware logging, metric sinks (metrics.jsonl + TensorBoard) and progress display."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

_RANK = 0


def setup_logging(rank: int, level: str = "INFO") -> None:
    """Rank 0 logs at `level`, other ranks warnings only, each line tagged with the rank."""
    global _RANK
    _RANK = rank
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level) if rank == 0 else logging.WARNING)


def is_rank0() -> bool:
    return _RANK == 0


def progress(iterable: Iterable[T], *, desc: str, total: int | None = None,
             enabled: bool = True) -> Iterable[T]:
    """A tqdm bar on rank 0 (stderr), the bare iterable elsewhere or when disabled."""
    if not (enabled and is_rank0()):
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, leave=False,
                disable=not sys.stderr.isatty() and os.environ.get("OPTUNE_PROGRESS") != "1")


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    """One JSON object per iteration in `exp_dir/metrics.jsonl`, the same scalars as TensorBoard
    events under `exp_dir/tensorboard`. Only rank 0 writes."""

    def __init__(self, exp_dir: str | Path, *, tensorboard: bool, enabled: bool):
        self.path = Path(exp_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(exp_dir) / "tensorboard"))

    def truncate_from(self, iteration: int) -> None:
        """Drop records of iterations >= `iteration`: on resume those iterations run again, and a
        record written after the last checkpoint must not appear twice."""
        if not (self.enabled and self.path.exists()):
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["iteration"] < iteration:
                    kept.append(line)
            except (ValueError, KeyError):
                pass   # a line torn by a kill mid-write
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._tb is not None:
            step = record["iteration"]
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(exp_dir: str | Path) -> list[dict]:
    """The records of `exp_dir/metrics.jsonl`, in order."""
    path = Path(exp_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
