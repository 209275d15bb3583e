"""Exit codes and one-line errors for the Hydra entry points (train, train_rm, serve_rm).

Hydra reports its own errors (an unknown key, a value of the wrong type, a malformed override) on
several lines and exits with 1. `run_hydra_main` makes them propagate (HYDRA_FULL_ERROR) and turns
them, and every `ConfigError` raised by the program, into one line naming the key, with exit code 2;
the other error kinds of `optune_nemo.errors` get their own one line and exit code.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import typing

from optune_nemo.errors import EXIT_CHECKPOINT, EXIT_USER, CheckpointError, ConfigError, RunDirBusy, StorageError
from optune_nemo.runtime.rundir import rank_from_env


def _fields_under(schema, dotted: str) -> list[str] | None:
    """The keys allowed under `dotted` (a section of the schema), or None when it is no section."""
    node = schema
    for part in [p for p in dotted.split(".") if p]:
        hints = typing.get_type_hints(node)
        if part not in hints or not dataclasses.is_dataclass(hints[part]):
            return None
        node = hints[part]
    return [f.name for f in dataclasses.fields(node)]


def config_error_line(e: BaseException, schema) -> str | None:
    """One line for a Hydra / OmegaConf error about the configuration, or None for other errors."""
    from hydra.errors import HydraException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    for ex in (e, e.__cause__):
        if isinstance(ex, OmegaConfBaseException) and getattr(ex, "full_key", None):
            key = ex.full_key
            if isinstance(ex, (ConfigAttributeError, ConfigKeyError)):
                parent = key.rpartition(".")[0]
                allowed = _fields_under(schema, parent)
                where = f"under {parent}" if parent else "at the top level"
                return f"{key}: unknown key" + (f" (keys {where}: {', '.join(allowed)})" if allowed else "")
            return f"{key}: {str(ex.msg).splitlines()[0]}"
    if isinstance(e, (HydraException, OmegaConfBaseException)):
        return str(e).splitlines()[0]
    return None


_CAPTURED: list[BaseException] = []


def captured(fn):
    """Wrap a Hydra task function so its exception is kept for `run_hydra_main` instead of going through
    Hydra's job runner (which prints the job's overrides before re-raising). Apply under `@hydra.main`."""
    @functools.wraps(fn)
    def task(dcfg):
        try:
            return fn(dcfg)
        except BaseException as e:
            _CAPTURED.append(e)
    return task


def run_hydra_main(task, *, prog: str, schema=None) -> int:
    """Run a `@hydra.main` function (its body wrapped in `captured`); returns the exit code (0, 2 for the
    user's input, 1 otherwise)."""
    os.environ["HYDRA_FULL_ERROR"] = "1"      # errors reach us instead of Hydra's multi-line report
    from optune_nemo.runtime.console import hold_early_records

    hold_early_records()                      # log records and warnings before the logging set-up: kept
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if rank_from_env() == 0 else (lambda line: None)
    try:
        return _run(task, say, schema, prog)
    finally:
        _close_process_group()


_PEER_SIGNS = ("Timed out", "Connection closed by peer", "Connection reset by peer", "Broken pipe",
               "Socket Timeout", "NCCL communicator was aborted")


def peer_failure(e: BaseException) -> str | None:
    """One line for a collective that failed because another rank died or hung (gloo / NCCL errors in a
    job of several processes), else None."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    text = str(e).splitlines()[0] if str(e) else ""
    if not isinstance(e, RuntimeError) or not any(sign in str(e) for sign in _PEER_SIGNS):
        return None
    return (f"another rank of the job died or did not answer within parallel.distributed_timeout_minutes "
            f"({type(e).__name__}: {text[:300]}); the job stops, rerun the same command to resume")


def _close_process_group() -> None:
    """Leave torch.distributed cleanly: NCCL otherwise warns at exit, after our last line."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _run(task, say, schema, prog: str) -> int:
    from optune_nemo.config import OptuneNemoConfig
    from optune_nemo.reward.base import RewardError

    try:
        task()
        if _CAPTURED:
            raise _CAPTURED.pop()
    except SystemExit as e:                   # --help, --cfg, and Hydra's own usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except ConfigError as e:
        say(f"{prog}: configuration error: {e}")
        return EXIT_USER
    except RunDirBusy as e:       # another run holds exp_dir: nothing was written
        say(f"{prog}: error: {e}")
        return EXIT_USER
    except CheckpointError as e:  # damaged or unsafe checkpoint file: nothing was loaded from it
        say(f"{prog}: checkpoint error: {e}")
        return EXIT_CHECKPOINT
    except RewardError as e:      # a reward service down, or a reward model failing (RewardUnavailable too)
        say(f"{prog}: error: {e} (everything generated so far is kept: rerun the same command to resume)")
        return 1
    except StorageError as e:     # no room for the next checkpoint: the earlier ones are intact
        say(f"{prog}: error: {e}")
        return 1
    except Exception as e:
        line = config_error_line(e, schema or OptuneNemoConfig)
        if line is None:
            peer = peer_failure(e)
            if peer is None:
                raise
            # every rank says it (rank 0 may be the one that died), each once
            print(f"{prog}: error on rank {rank_from_env()}: {peer}", file=sys.stderr, flush=True)
            return 1
        say(f"{prog}: configuration error: {line}")
        return 2
    return 0
