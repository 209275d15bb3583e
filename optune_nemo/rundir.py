"""What a run invocation may leave in exp_dir when the user's input turns out to be wrong.

Everything that can be checked is checked before exp_dir is first written. What can only fail later
(a prompt file read with the model's tokenizer, a reward function that returns NaN at iteration 2) is a
`ConfigError` too, and then `RunDir` removes every entry this invocation created: a later
`resume=auto` never picks up state produced with a broken input. Entries that existed before the
invocation (checkpoints of an earlier, good attempt) stay. Other failures (a crash, a reward server
that stays down) leave everything in place: that state is valid and a rerun resumes from it.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from optune_nemo.config import ConfigError

log = logging.getLogger(__name__)

_DEPTH = 3   # exp_dir/checkpoints/iter_N, exp_dir/partial/iter_N/chunk_K.json, exp_dir/hf/iter_N


def rank_from_env() -> int:
    """This process's global rank before any process group exists (torchrun, then Slurm, else 0)."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 0


def world_size_from_env() -> int:
    """The world size before any process group exists (torchrun, then Slurm, else 1)."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 1


def _entries(root: Path) -> set[Path]:
    out: set[Path] = set()
    if not root.is_dir():
        return out
    stack = [(root, 0)]
    while stack:
        d, depth = stack.pop()
        for p in d.iterdir():
            out.add(p)
            if p.is_dir() and not p.is_symlink() and depth + 1 < _DEPTH:
                stack.append((p, depth + 1))
    return out


class RunDir:
    """Context manager around one invocation's use of `exp_dir` (see the module docstring)."""

    def __init__(self, exp_dir: str | Path, *, rank: int):
        self.root, self.rank = Path(exp_dir), rank

    def __enter__(self) -> RunDir:
        self.existed = self.root.exists()
        self.before = _entries(self.root)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None and issubclass(exc_type, ConfigError) and self.rank == 0:
            self.remove_created()
        return False

    def remove_created(self) -> None:
        if not self.existed:
            shutil.rmtree(self.root, ignore_errors=True)
            return
        for path in sorted(_entries(self.root) - self.before, key=lambda p: len(p.parts)):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        log.debug("removed what this invocation created under %s", self.root)
