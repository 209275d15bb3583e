"""Cooperative stop on SIGUSR1/SIGTERM (Slurm's pre-emption warning and job end).

The handler only records the signal; the run polls `requested()` at safe points (between
generation chunks, between phases, after a checkpoint). The poll is collective: every rank sees
the same answer, because a rank that stops alone would leave the others hanging in a collective.
"""

from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class PreemptionGuard:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)):
        self._received: int | None = None
        self._agreed = False
        for sig in signals:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self._received = signum

    def requested(self) -> bool:
        """Collective: True on every rank once any rank has received a stop signal."""
        if self._agreed:
            return True
        flag = torch.tensor([1 if self._received is not None else 0], dtype=torch.int32)
        if dist.is_initialized():
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self._agreed = bool(flag.item())
        if self._agreed:
            log.warning("stop requested (signal %s): stopping at this safe point",
                        signal.Signals(self._received).name if self._received else "on another rank")
        return self._agreed
