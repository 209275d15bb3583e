"""MLflow: one MLflow run per exp_dir, continued on resume (the same run id, status back to RUNNING).

Through `MlflowClient` (no fluent global "active run"). The resolved config goes in twice: as params
(flattened dotted keys; MLflow params are immutable, so a resume adds new keys only and the changed values
stay in the run's config.yaml artifact, rewritten at every open) and as that artifact. Held-out examples are
JSON tables under eval_examples/. Credentials are MLflow's own business (MLFLOW_TRACKING_TOKEN,
MLFLOW_TRACKING_USERNAME / _PASSWORD in the environment); nothing here reads or writes them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from optune_nemo.config import TRACKING_EXTRA, ConfigError
from optune_nemo.sinks import run_name, user_tags

try:
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    HAVE_MLFLOW = True
except ImportError:
    HAVE_MLFLOW = False

BATCH = 100
"""Params / metrics per log_batch call (MLflow's limit on params per batch)."""


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return out


class MlflowSink:
    def __init__(self, logging, *, exp_dir: Path, tags: dict[str, str]):
        if not HAVE_MLFLOW:
            raise ConfigError(f"logging.mlflow.enabled: needs the mlflow package ({TRACKING_EXTRA}), "
                              "or set it to false")
        self.cfg, self.exp_dir = logging.mlflow, Path(exp_dir)
        self.tags = {**tags, **user_tags(self.cfg.tags)}
        self.client, self.run_id = None, None

    def open(self, *, resume: dict | None) -> dict:
        self.client = MlflowClient(tracking_uri=self.cfg.tracking_uri)
        if resume:
            self.run_id = resume["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            exp = self.client.get_experiment_by_name(self.cfg.experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(
                self.cfg.experiment, artifact_location=self.cfg.artifact_location)
            self.run_id = self.client.create_run(exp_id, run_name=run_name(self.cfg.name, self.exp_dir),
                                                 tags=self.tags).info.run_id
        return {"run_id": self.run_id, "experiment": self.cfg.experiment}

    def log_config(self, config: dict) -> None:
        import yaml

        have = self.client.get_run(self.run_id).data.params
        params = [Param(k, v) for k, v in flatten(config).items() if k not in have]
        for i in range(0, len(params), BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + BATCH])
        self.client.log_text(self.run_id, yaml.safe_dump(config, sort_keys=False), "config.yaml")

    def log(self, scalars: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in scalars.items()]
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + BATCH])

    def log_examples(self, rows: list[dict[str, str]], step: int) -> None:
        columns = list(rows[0]) if rows else ["prompt", "response"]
        self.client.log_dict(self.run_id, {"columns": columns, "data": [[r[c] for c in columns] for r in rows]},
                             f"eval_examples/iter_{step:06d}.json")

    def close(self) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status="FINISHED")
            self.run_id = None
