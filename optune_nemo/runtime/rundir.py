"""What a run invocation may leave in exp_dir when the user's input turns out to be wrong.

Everything that can be checked is checked before exp_dir is first written. What can only fail later
(a prompt file read with the model's tokenizer, a reward function that returns NaN at iteration 2) is a
`ConfigError` too, and then `RunDir` removes every entry this invocation created: a later
`resume=auto` never picks up state produced with a broken input. Entries that existed before the
invocation (checkpoints of an earlier, good attempt) stay. Other failures (a crash, a reward server
that stays down) leave everything in place: that state is valid and a rerun resumes from it.

One writer per run directory: `hold_run_dir` takes an exclusive lock on `exp_dir/.lock` before the run's
first write and keeps it for the life of the process (see its docstring).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from optune_nemo.errors import CheckpointError, ConfigError, RunDirBusy

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
    """Context manager around one invocation's use of `exp_dir` (see the module docstring). On a
    `ConfigError` or `CheckpointError` it removes what the invocation created, provided the invocation had
    taken exp_dir's lock (`hold_run_dir`; it writes nothing before), and it gives the lock up on exit."""

    def __init__(self, exp_dir: str | Path, *, rank: int):
        self.root, self.rank = Path(exp_dir), rank

    def __enter__(self) -> RunDir:
        self.existed = self.root.exists()
        self.before = _entries(self.root)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        # only what this run wrote, and it writes only once it holds the lock: before that, a refused or
        # failing start may not touch a directory that another run is writing
        if (exc_type is not None and issubclass(exc_type, (ConfigError, CheckpointError)) and self.rank == 0
                and holds_run_dir(self.root)):
            self.remove_created()
        release_run_dir(self.root)
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


# --------------------------------------------------------------------------- one writer per exp_dir

LOCK_FILE = ".lock"
_HELD: dict[Path, int] = {}      # resolved exp_dir -> the open descriptor that holds its lock


def _holder() -> dict:
    job = os.environ.get("SLURM_JOB_ID")
    if job and os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": job,
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _describe(raw: str) -> str:
    try:
        h = json.loads(raw)
        text = f"host {h['host']}, pid {h['pid']}"
        if h.get("slurm_job_id"):
            text += f", Slurm job {h['slurm_job_id']}"
        return text + f", since {h['since']}"
    except (ValueError, KeyError, TypeError):
        return "holder not recorded yet"


def _try_lock(exp_dir: Path) -> str | None:
    """Rank 0: take the lock of `exp_dir`, or say who holds it."""
    key = exp_dir.resolve()
    if key in _HELD:                 # this process holds it already (a second build in one process)
        return None
    exp_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(exp_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raw = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            return (f"exp_dir {exp_dir} is in use by another run ({_describe(raw)}); wait for it to end "
                    "(its lock is released the moment it exits) or choose another exp_dir")
        os.close(fd)
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            log.warning("the file system of %s does not support file locks (%s): nothing stops a second run "
                        "from writing into it at the same time", exp_dir, os.strerror(e.errno))
            _HELD[key] = -1
            return None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_holder()).encode(), 0)
    os.fsync(fd)
    _HELD[key] = fd
    return None


def hold_run_dir(exp_dir: str | Path, *, rank: int = 0) -> None:
    """Collective: make this job the only writer of `exp_dir`, before its first write.

    Rank 0 takes an exclusive `flock` on `exp_dir/.lock` (creating exp_dir if needed) for the job; the
    other ranks write only what rank 0 lets them, so one lock covers the job. The operating system
    releases the lock when the holding process ends in any way, SIGKILL included, so a requeued job gets it
    as soon as the one it replaces is gone, and there is never a stale lock to clean up. The lock file
    keeps the holder's host, pid, Slurm job id and start time, for the refusal's message. When another
    process holds it, every rank raises `RunDirBusy` (exit 2) and nothing is written. On a file system
    without lock support a warning says the directory is unprotected and the run goes on."""
    refusal = _try_lock(Path(exp_dir)) if rank == 0 else None
    tdist = sys.modules.get("torch.distributed")     # a process group exists only where torch made one
    if tdist is not None and tdist.is_available() and tdist.is_initialized():
        from optune_nemo.runtime.distributed import broadcast_object

        refusal = broadcast_object(refusal)
    if refusal is not None:
        raise RunDirBusy(refusal)


def release_run_dir(exp_dir: str | Path) -> None:
    """Give the lock up (the process exiting does it too)."""
    fd = _HELD.pop(Path(exp_dir).resolve(), None)
    if fd is not None and fd >= 0:
        os.close(fd)


def holds_run_dir(exp_dir: str | Path) -> bool:
    """Whether this process took `exp_dir` for its run (`hold_run_dir`)."""
    return Path(exp_dir).resolve() in _HELD
