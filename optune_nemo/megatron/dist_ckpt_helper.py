"""The helper process megatron's checkpoint writer needs, made to live and die with the run.

megatron-core 0.16.1's `FileSystemWriterAsync` collects write results through a queue served by a
spawned `multiprocessing` Manager process (`filesystem_async._get_write_results_queue`), started on
the first save and never stopped. Left as megatron starts it, that process
  - outlives a run killed with SIGKILL (it has no parent-death signal): every killed run leaks one;
  - dies from a pre-emption signal: Slurm signals every process of the job step, the spawned server
    keeps the default action for SIGUSR1/SIGTERM, and the next save fails with a broken pipe.
`install_results_queue()` starts that Manager itself, before megatron would, with an initializer that
ignores the stop signals (the run itself decides when to stop) and asks the kernel to kill the server
when its parent dies (Linux `PR_SET_PDEATHSIG`).
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
from multiprocessing.managers import SyncManager

_PR_SET_PDEATHSIG = 1
_manager: SyncManager | None = None


def die_with_parent(parent_pid: int) -> None:
    """In a child process: be killed when `parent_pid` dies (Linux), or exit now if it already has."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:     # the parent died before the request took effect
        os._exit(0)


def _server_init(parent_pid: int) -> None:
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent(parent_pid)


def install_results_queue() -> None:
    """Give megatron's checkpoint writer a results queue served by a well-behaved Manager (idempotent)."""
    global _manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    _manager = SyncManager(ctx=mp.get_context("spawn"))
    _manager.start(initializer=_server_init, initargs=(os.getpid(),))
    filesystem_async._results_queue = _manager.Queue()
