"""TensorBoard events under exp_dir/tensorboard (the scalars of every record, step = iteration)."""

from __future__ import annotations

from pathlib import Path


class TensorBoardSink:
    def __init__(self, logging, *, exp_dir: Path, tags: dict[str, str]):
        self.dir = Path(exp_dir) / "tensorboard"
        self._writer = None

    def open(self, *, resume: dict | None) -> None:
        return None              # events append to the directory; the writer starts with the first record

    def log_config(self, config: dict) -> None:
        pass                     # exp_dir/config.yaml holds it

    def log(self, scalars: dict[str, float], step: int) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.dir))
        for key, value in scalars.items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def log_examples(self, rows: list[dict[str, str]], step: int) -> None:
        pass                     # eval.json holds them

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
