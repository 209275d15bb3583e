"""Metric sinks: where each iteration's metrics record goes besides `exp_dir/metrics.jsonl` (the source of
truth, written by `optune_nemo.runtime.metrics.MetricsWriter`, which drives the sinks on rank 0 only).

One module per sink; `SINKS` is the registry from a name (its switch under `logging.*`) to its class. The
sinks are registered here by import path rather than in their modules, so that a sink's module, and the
optional package it imports when imported (wandb, mlflow: guarded by `HAVE_WANDB` / `HAVE_MLFLOW` there),
is imported only when the sink is enabled (`config.validate_logging` refuses an enabled sink whose package
is missing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from optune_nemo.registry import Registry

SINKS = Registry("logging", sort=False)
"""Sink name (its switch: logging.tensorboard, logging.wandb.enabled, logging.mlflow.enabled) -> class, in the
order the sinks are built and opened."""
SINKS.register_path("tensorboard", "optune_nemo.sinks.tensorboard:TensorBoardSink")
SINKS.register_path("wandb", "optune_nemo.sinks.wandb:WandbSink")
SINKS.register_path("mlflow", "optune_nemo.sinks.mlflow:MlflowSink")

TAG_KEYS = {"optune.rho": "rho", "optune.selection": "selection", "loss.name": "loss", "seed": "seed"}
"""Config keys every tracker run is tagged with (those the run's schema has), and the tag's name."""


class MetricSink(Protocol):
    """One destination of the metrics records. Built with `(logging_config, *, exp_dir, tags)`; every method
    runs on rank 0 only. Steps are the records' `iteration` (the optimizer step for train_rm)."""

    def open(self, *, resume: dict | None) -> dict | None:
        """Start a run, or continue the one `resume` identifies (what `open` returned in an earlier
        invocation of this exp_dir, kept in exp_dir/trackers.json). Returns what identifies the run for a
        later resume (no secrets: it is written to a file), or None when there is nothing to continue."""

    def log_config(self, config: dict) -> None:
        """The resolved configuration (nested dict), once per `open`."""

    def log(self, scalars: dict[str, float], step: int) -> None:
        """One record's numbers at `step`."""

    def log_examples(self, rows: list[dict[str, str]], step: int) -> None:
        """A table of held-out examples (prompt, response) evaluated after `step`."""

    def close(self) -> None:
        """Finish the run (a later `open(resume=...)` continues it)."""


def sink_class(name: str) -> type:
    return SINKS.get(name)


def enabled_sinks(logging) -> list[str]:
    """The names of the sinks `logging` (a LoggingConfig) switches on, in SINKS order."""
    on = {"tensorboard": logging.tensorboard, "wandb": logging.wandb.enabled, "mlflow": logging.mlflow.enabled}
    return [name for name in SINKS.names() if on[name]]


def build_sinks(logging, *, exp_dir: Path, config: dict) -> dict[str, MetricSink]:
    """The enabled sinks by name, not opened yet. `config` (the resolved config as a nested dict) gives the
    tags of TAG_KEYS."""
    tags = config_tags(config)
    return {name: sink_class(name)(logging, exp_dir=Path(exp_dir), tags=tags) for name in enabled_sinks(logging)}


def config_tags(config: dict) -> dict[str, str]:
    """{tag name: value} for the TAG_KEYS the config has."""
    tags = {}
    for dotted, tag in TAG_KEYS.items():
        node = config
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            tags[tag] = str(node)
    return tags


def user_tags(tags: list[str]) -> dict[str, str]:
    """`key=value` or a bare `key` (value "true") per user tag."""
    return dict((t.split("=", 1) + ["true"])[:2] for t in tags)


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a metrics record a tracker plots (everything numeric but the step itself)."""
    return {k: v for k, v in record.items()
            if k != "iteration" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_name(name: str | None, exp_dir: Path) -> str:
    return name or Path(exp_dir).resolve().name
