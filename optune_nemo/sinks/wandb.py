"""Weights & Biases: one W&B run per exp_dir, continued on resume (`id=..., resume="allow"`).

The run's local files go under exp_dir/wandb (in `offline` mode that is all there is, until `wandb sync`).
The API key is W&B's own business (WANDB_API_KEY or `wandb login`); nothing here reads or writes it.
"""

from __future__ import annotations

from pathlib import Path

from optune_nemo.config import TRACKING_EXTRA, ConfigError
from optune_nemo.sinks import run_name, user_tags

try:
    import wandb

    HAVE_WANDB = True
except ImportError:
    HAVE_WANDB = False

EXAMPLES_KEY = "eval_examples"
"""The history key of the held-out examples table."""


class WandbSink:
    def __init__(self, logging, *, exp_dir: Path, tags: dict[str, str]):
        if not HAVE_WANDB:
            raise ConfigError(f"logging.wandb.enabled: needs the wandb package ({TRACKING_EXTRA}), or set it to false")
        self.cfg, self.exp_dir = logging.wandb, Path(exp_dir)
        self.tags = [f"{k}={v}" for k, v in tags.items()] + [
            k if v == "true" else f"{k}={v}" for k, v in user_tags(self.cfg.tags).items()]
        self.run = None

    def open(self, *, resume: dict | None) -> dict:
        self.exp_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(project=self.cfg.project, entity=self.cfg.entity,
                                  name=run_name(self.cfg.name, self.exp_dir), tags=self.tags, dir=str(self.exp_dir),
                                  mode=self.cfg.mode, id=resume["run_id"] if resume else None,
                                  resume="allow" if resume else None, reinit="create_new")
        except wandb.errors.UsageError as e:      # no API key, an unknown entity or project
            raise ConfigError(f"logging.wandb.mode: {self.cfg.mode} refused by W&B: {str(e).splitlines()[0]} "
                              "(the key comes from WANDB_API_KEY or `wandb login`; mode=offline needs none)") from None
        return {"run_id": self.run.id, "project": self.cfg.project}

    def log_config(self, config: dict) -> None:
        # a resumed run may change settings (more iterations): the newest value wins
        self.run.config.update(config, allow_val_change=True)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def log_examples(self, rows: list[dict[str, str]], step: int) -> None:
        columns = list(rows[0]) if rows else ["prompt", "response"]
        table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
        self.run.log({EXAMPLES_KEY: table}, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
