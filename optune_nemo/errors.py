"""The kinds of error a user meets, and the exit code each one ends a command with.

Ground floor: imports nothing of the project. Every entry point (`train`, `train_rm`, `serve_rm`, `sweep`)
turns these into one line on stderr, no traceback (optune_nemo/runner.py).

  exit 2  `ConfigError`: the user's configuration, files or functions are wrong; nothing this invocation
          created is left behind. `RunDirBusy` too: another run holds exp_dir; nothing was written.
  exit 3  `CheckpointError`: a checkpoint file is damaged, incomplete or unsafe (a manifest mismatch, a
          missing shard, an object the weights-only loader refuses, a pickle global outside checkpoint
          metadata). The message names the file. Nothing was loaded from it.
  exit 1  `StorageError` (no room for the next checkpoint), a reward service that stays down, or a bug
          (then with a traceback): a rerun resumes from the last complete checkpoint.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USER = 2
EXIT_CHECKPOINT = 3


class ConfigError(ValueError):
    """A configuration value is not allowed. The message names the key and what is allowed."""


class RunDirBusy(RuntimeError):
    """Another run holds the lock of this exp_dir (the message names exp_dir and the holder). Not a
    `ConfigError`: nothing may be cleaned up, the files belong to the run that holds the lock."""


class CheckpointError(RuntimeError):
    """A checkpoint file is unreadable or not what this system writes (the message names the file)."""


class StorageError(RuntimeError):
    """The checkpoint directory's file system has no room for the next checkpoint (exit 1: free space,
    rerun, and the run resumes from the last checkpoint)."""


def first_line(e: BaseException) -> str:
    """`Type: first line of the message`, for one-line reports of a caught exception."""
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class RewardError(RuntimeError):
    """A reward could not be computed (an error inside a reward model, on some rank)."""


class RewardUnavailable(RewardError):
    """A reward service cannot be reached or did not answer in time; nothing generated is lost."""
