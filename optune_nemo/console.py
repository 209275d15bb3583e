"""Rank-aware console output: logging set-up and progress bars."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")

_RANK = 0


def setup_logging(rank: int, level: str = "INFO") -> None:
    """Rank 0 logs at `level`, other ranks warnings only, each line tagged with the rank."""
    global _RANK
    _RANK = rank
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level) if rank == 0 else logging.WARNING)


def is_rank0() -> bool:
    return _RANK == 0


def progress(iterable: Iterable[T], *, desc: str, total: int | None = None,
             enabled: bool = True) -> Iterable[T]:
    """A tqdm bar on rank 0 (stderr), the bare iterable elsewhere or when disabled."""
    if not (enabled and is_rank0()):
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, leave=False,
                disable=not sys.stderr.isatty() and os.environ.get("OPTUNE_PROGRESS") != "1")
