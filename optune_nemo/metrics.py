"""Metric sinks: one record per iteration in `exp_dir/metrics.jsonl` and TensorBoard events.

The records are also a checkpoint part: a checkpoint holds the records of every iteration up to its
own (`metrics.jsonl` inside it), so the record of an iteration is committed together with the
iteration's checkpoint, and a resume rewrites `exp_dir/metrics.jsonl` from it. A kill between the
checkpoint and the append to `exp_dir/metrics.jsonl` therefore loses no record, and a record of an
iteration that will run again never stays behind.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from optune_nemo.fileio import write_text_atomic

FILE = "metrics.jsonl"


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _lines(records: list[dict]) -> str:
    return "".join(json.dumps({k: _jsonable(v) for k, v in r.items()}) + "\n" for r in records)


def _parse(text: str) -> list[dict]:
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass   # a line torn by a kill mid-write
    return records


class MetricsWriter:
    """Records in `exp_dir/metrics.jsonl` and TensorBoard events under `exp_dir/tensorboard`. Only the
    enabled writer (rank 0) writes files; every rank keeps the records."""

    def __init__(self, exp_dir: str | Path, *, tensorboard: bool, enabled: bool):
        self.exp_dir = Path(exp_dir)
        self.path = self.exp_dir / FILE
        self.enabled, self.tensorboard = enabled, tensorboard
        self.records: list[dict] = []
        self._written = 0          # records already in metrics.jsonl / TensorBoard
        self._tb = None

    def _writer(self):
        if self._tb is None and self.enabled and self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.exp_dir / "tensorboard"))
        return self._tb

    def add(self, record: dict) -> None:
        """Keep a record (it goes into the next checkpoint); `flush` writes it out."""
        self.records.append(record)

    def flush(self) -> None:
        """Append the records not written yet to metrics.jsonl and TensorBoard."""
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, _lines(self.records))
            tb = self._writer()
            for record in self.records[self._written:]:
                if tb is not None:
                    for key, value in record.items():
                        if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool):
                            tb.add_scalar(key, value, record["iteration"])
            if tb is not None:
                tb.flush()
        self._written = len(self.records)

    def start_fresh(self) -> None:
        """A run with no checkpoint to resume: no record survives from an earlier attempt."""
        self.records, self._written = [], 0
        if self.enabled and self.path.exists():
            write_text_atomic(self.path, "")

    # ------------------------------------------------------------------ checkpoint part

    def save(self, directory: Path) -> None:
        if self.enabled:
            write_text_atomic(Path(directory) / FILE, _lines(self.records))

    def load(self, directory: Path) -> None:
        """The checkpoint's records become the run's; records of later iterations are dropped, and any
        record metrics.jsonl missed (a kill right after the checkpoint) is written now."""
        self.records = _parse((Path(directory) / FILE).read_text())
        already = _parse(self.path.read_text()) if self.path.is_file() else []
        self._written = sum(1 for a, b in zip(already, self.records) if a == b)
        self.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(exp_dir: str | Path) -> list[dict]:
    """The records of `exp_dir/metrics.jsonl`, in order (a torn last line is skipped)."""
    return _parse((Path(exp_dir) / FILE).read_text())
