"""Metrics records: one per iteration in `exp_dir/metrics.jsonl` (the source of truth), and the metric sinks
(`optune_nemo.sinks`: TensorBoard, Weights & Biases, MLflow) fed from it on rank 0.

The records are also a checkpoint part: a checkpoint holds the records of every iteration up to its
own (`metrics.jsonl` inside it), so the record of an iteration is committed together with the
iteration's checkpoint, and a resume rewrites `exp_dir/metrics.jsonl` from it. A kill between the
checkpoint and the append to `exp_dir/metrics.jsonl` therefore loses no record, and a record of an
iteration that will run again never stays behind.

The trackers (W&B, MLflow) keep their run id in `exp_dir/trackers.json` with the last step they were sent:
a resume continues the same tracker run and sends only the records of later steps (a resume from an older
checkpoint, `resume=<dir>`, re-runs iterations the tracker already has: their new records go to
metrics.jsonl and TensorBoard, not to the tracker, whose history never goes back). A start without a
checkpoint to resume starts new tracker runs, unless the earlier attempt's runs got no record yet.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from optune_nemo.runtime.fileio import write_json_atomic, write_text_atomic

FILE = "metrics.jsonl"
TRACKERS = "trackers.json"
"""{sink name: {"run": what its open() returned, "last_step": the last step sent or null}}."""


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
    """Records in `exp_dir/metrics.jsonl`, and the enabled metric sinks (TensorBoard events under
    `exp_dir/tensorboard`, W&B, MLflow). Only the enabled writer (rank 0) writes files and talks to sinks;
    every rank keeps the records."""

    def __init__(self, exp_dir: str | Path, *, tensorboard: bool, enabled: bool, sinks: dict | None = None,
                 config: dict | None = None):
        self.exp_dir = Path(exp_dir)
        self.path = self.exp_dir / FILE
        self.enabled, self.tensorboard = enabled, tensorboard
        self.records: list[dict] = []
        self._written = 0          # records already in metrics.jsonl / the sinks
        if sinks is None:
            from optune_nemo.sinks.tensorboard import TensorBoardSink

            sinks = {"tensorboard": TensorBoardSink(None, exp_dir=self.exp_dir, tags={})} if tensorboard else {}
        self.sinks = sinks if enabled else {}
        self.config = config or {}
        self._trackers: dict | None = None   # exp_dir/trackers.json once the sinks are open

    @classmethod
    def from_config(cls, cfg, *, enabled: bool) -> MetricsWriter:
        """The writer of a run (OPTune or train_rm): exp_dir and the sinks from `cfg.logging`; the sinks are
        built on the enabled rank only."""
        import dataclasses

        from optune_nemo.sinks import build_sinks

        config = dataclasses.asdict(cfg)
        sinks = build_sinks(cfg.logging, exp_dir=Path(cfg.exp_dir), config=config) if enabled else {}
        return cls(cfg.exp_dir, tensorboard=cfg.logging.tensorboard, enabled=enabled, sinks=sinks, config=config)

    def add(self, record: dict) -> None:
        """Keep a record (it goes into the next checkpoint); `flush` writes it out."""
        self.records.append(record)

    def flush(self) -> None:
        """Append the records not written yet to metrics.jsonl and send them to the sinks."""
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, _lines(self.records))
            self._send(self.records[self._written:])
        self._written = len(self.records)

    def start_fresh(self) -> None:
        """A run with no checkpoint to resume: no record survives from an earlier attempt."""
        self.records, self._written = [], 0
        if self.enabled and self.path.exists():
            write_text_atomic(self.path, "")
        if self.enabled:
            self._open(fresh=True)

    # ------------------------------------------------------------------ sinks

    def _open(self, *, fresh: bool) -> None:
        """Open the sinks once: continue the tracker runs of exp_dir/trackers.json (after `fresh`, only those
        that got no record yet), and send each the resolved config."""
        if self._trackers is not None:
            return
        path = self.exp_dir / TRACKERS
        saved = json.loads(path.read_text()) if path.is_file() else {}
        # the runs of trackers switched off now stay for a later resume that switches them on again
        self._trackers = {} if fresh else {k: v for k, v in saved.items() if k not in self.sinks}
        for name, sink in self.sinks.items():
            entry = saved.get(name)
            if entry is not None and fresh and entry["last_step"] is not None:
                entry = None
            run = sink.open(resume=entry["run"] if entry else None)
            if run is not None:
                self._trackers[name] = {"run": run, "last_step": entry["last_step"] if entry else None}
            if self.config:
                sink.log_config(self.config)
        self._save_trackers()

    def _send(self, records: list[dict]) -> None:
        from optune_nemo.sinks import scalars

        if not self.sinks:
            return
        self._open(fresh=False)
        examples = _examples(self.exp_dir) if any(n in self._trackers for n in self.sinks) and records else {}
        for name, sink in self.sinks.items():
            last = self._trackers[name]["last_step"] if name in self._trackers else None
            for record in records:
                step = record["iteration"]
                if last is not None and step <= last:
                    continue            # the tracker has this step (see the module docstring)
                if name in self._trackers and str(step) in examples:
                    sink.log_examples(examples[str(step)], step)
                sink.log(scalars(record), step)
                if name in self._trackers:
                    self._trackers[name]["last_step"] = last = step
        self._save_trackers()

    def _save_trackers(self) -> None:
        path = self.exp_dir / TRACKERS
        if self._trackers or path.is_file():
            write_json_atomic(path, self._trackers)

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
        for sink in self.sinks.values():
            sink.close()
        self._trackers = None


def _examples(exp_dir: Path) -> dict[str, list[dict]]:
    """{iteration: [{"prompt", "response"}, ...]}: the held-out examples exp_dir/eval.json keeps per
    evaluated iteration (written before the iteration's record is flushed; none for train_rm)."""
    path = Path(exp_dir) / "eval.json"
    if not path.is_file():
        return {}
    iterations = json.loads(path.read_text()).get("iterations") or {}
    return {t: v["examples"] for t, v in iterations.items() if v.get("examples")}


def read_metrics(exp_dir: str | Path) -> list[dict]:
    """The records of `exp_dir/metrics.jsonl`, in order (a torn last line is skipped)."""
    return _parse((Path(exp_dir) / FILE).read_text())
