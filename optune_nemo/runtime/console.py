"""Rank-aware console output: the run's own lines on the console, the libraries' in exp_dir/logs.

The console (stderr) shows this project's loggers (`optune_nemo.*`, `__main__`) at `logging.level` on
rank 0 and at WARNING on the other ranks. Other libraries' records (megatron's configuration dumps and
bucket listings, transformers) reach it only at ERROR, and Python warnings (megatron's "Transformer
Engine / Apex is not installed" notices, torch's FutureWarnings; `logging.captureWarnings`) not at all,
unless `logging.level=DEBUG` (rank 0). Every record at INFO and above (DEBUG too with
`logging.level=DEBUG`), of every logger, goes in full to `<log_dir>/rank<R>.log`, one file per rank.

    hold_early_records()            # process start (cli.run_hydra_main): nothing is lost before set-up
    setup_logging(rank, level)      # the configuration is known: console filtering from here on
    log_to(exp_dir / "logs")        # the run's first write: the held records, then every new one

Nothing is written before `log_to`: until the run creates exp_dir, the records wait in memory, so a run
refused for its input leaves no trace on disk (`rundir`).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

_RANK = 0
_PROJECT = ("optune_nemo", "__main__")
_HELD_MAX = 20_000          # records held for the log file before it exists (a long start-up at DEBUG)
_SHOWN = "_optune_shown"    # set on a record the early handler already printed


def is_project(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in _PROJECT)


class _ConsoleFilter(logging.Filter):
    """This project's records from `project_level`, other libraries' from `library_level`, Python warnings
    (deprecations, fallbacks: for developers, not for the person running the job) only at DEBUG."""

    def __init__(self, project_level: int, library_level: int, debug: bool):
        super().__init__()
        self.project_level, self.library_level, self.debug = project_level, library_level, debug

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, _SHOWN, False):
            return False
        if is_project(record.name):
            return record.levelno >= self.project_level
        if record.name == "py.warnings" and record.levelno == logging.WARNING:
            return self.debug
        return record.levelno >= self.library_level


class _ConsoleFormatter(logging.Formatter):
    """`12:00:05 message` for the run's own INFO lines; the level for warnings and errors, the logger's
    name for another library's record, and the rank where there are several."""

    def __init__(self, rank: int, world_size: int):
        super().__init__()
        self.prefix = f"[rank{rank}] " if world_size > 1 else ""

    def format(self, record: logging.LogRecord) -> str:
        head = time.strftime("%H:%M:%S", time.localtime(record.created)) + " " + self.prefix
        if record.levelno != logging.INFO:
            head += record.levelname + " "
        if not is_project(record.name):
            head += record.name + ": "
        text = head + record.getMessage().rstrip()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _Console(logging.StreamHandler):
    """Writes to the `sys.stderr` of the moment (a test's capture, a stream redirected after set-up)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


_FILE_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


class _RunLog(logging.Handler):
    """Holds records until `open` names the file, then writes them and every later one to it."""

    def __init__(self, level: int):
        super().__init__(level)
        self.setFormatter(_FILE_FORMAT)
        self.held: list[logging.LogRecord] = []
        self.stream = None
        self.path: Path | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None:
            if len(self.held) < _HELD_MAX:
                self.held.append(record)
            return
        try:
            self.stream.write(self.format(record).rstrip() + "\n")
            self.stream.flush()
        except Exception:
            self.handleError(record)

    def open(self, path: Path) -> None:
        with self.lock:               # a library's thread may log meanwhile
            if self.stream is not None and self.path == path:
                return
            if self.stream is not None:
                self.stream.close()
            path.parent.mkdir(parents=True, exist_ok=True)
            self.path, self.stream = path, open(path, "a", encoding="utf-8")
            self.stream.write(f"---- {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: "
                              f"{' '.join(sys.argv)}\n")
            held, self.held = self.held, []
            for record in held:
                if record.levelno >= self.level:
                    self.emit(record)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        self.held = []
        super().close()


class _Early(logging.Handler):
    """Before `setup_logging`: holds every record; shows this project's warnings and anyone's errors at
    once, as Python's last-resort handler would."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.held: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= (logging.WARNING if is_project(record.name) else logging.ERROR):
            sys.stderr.write(record.getMessage() + "\n")
            setattr(record, _SHOWN, True)
        if len(self.held) < _HELD_MAX:
            self.held.append(record)


def hold_early_records() -> None:
    """At process start: hold every record and Python warning (imports warn) until `setup_logging`."""
    logging.captureWarnings(True)
    root = logging.getLogger()
    if not any(isinstance(h, _Early) for h in root.handlers):
        root.handlers[:] = [_Early()]
    root.setLevel(logging.INFO)     # not DEBUG: Hydra then dumps its defaults tree and search path


def setup_logging(rank: int, level: str = "INFO", *, run_log: bool = True) -> None:
    """The console of `rank` (module docstring), and a log file held in memory until `log_to` opens it.
    A process without a run directory (the reward server, the sweep driver) has no log file
    (`run_log=False`): its console shows other libraries' warnings too (Python warnings aside), or nothing
    would keep them."""
    from optune_nemo.runtime.rundir import world_size_from_env

    global _RANK
    _RANK = rank
    lvl = getattr(logging, level)
    debug = lvl <= logging.DEBUG
    console = _Console()
    console.setFormatter(_ConsoleFormatter(rank, world_size_from_env()))
    if rank != 0:                    # quiet unless something is wrong
        project, libraries = max(lvl, logging.WARNING), logging.ERROR
    elif debug:
        project = libraries = lvl
    else:
        project, libraries = lvl, logging.ERROR if run_log else max(lvl, logging.WARNING)
    console.addFilter(_ConsoleFilter(project, libraries, debug=debug and rank == 0))
    root = logging.getLogger()
    held: list[logging.LogRecord] = []
    for h in root.handlers:
        if isinstance(h, (_Early, _RunLog)) and getattr(h, "stream", None) is None:
            held += h.held            # this process's records that no file holds yet
        h.close()
    root.handlers[:] = [console, _RunLog(min(lvl, logging.INFO))] if run_log else [console]
    root.setLevel(min(lvl, logging.INFO) if run_log else lvl)
    logging.captureWarnings(True)
    _route_transformers(debug)
    for record in held:
        for h in root.handlers:
            if record.levelno >= h.level:
                h.handle(record)


def log_to(directory: str | Path) -> Path:
    """Collective at the run's first write: open `directory/rank<R>.log` (creating `directory`), write the
    records held since the process started, and every later one. Returns the file's path."""
    path = Path(directory) / f"rank{_RANK}.log"
    for h in logging.getLogger().handlers:
        if isinstance(h, _RunLog):
            h.open(path)
    return path


def _route_transformers(debug: bool) -> None:
    """transformers logs through a stderr handler of its own and does not propagate: send its records to
    ours instead, and keep its weight-loading progress bars off the console unless at DEBUG."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    if not debug:
        hf_logging.disable_progress_bar()


def is_rank0() -> bool:
    return _RANK == 0


def bar_shown(enabled: bool = True) -> bool:
    """Whether `progress(..., enabled=enabled)` draws a bar here (rank 0, stderr a terminal or
    OPTUNE_PROGRESS=1). Where it does not, a loop logs its progress as lines instead."""
    return enabled and is_rank0() and (sys.stderr.isatty() or os.environ.get("OPTUNE_PROGRESS") == "1")


def progress(iterable: Iterable[T], *, desc: str, total: int | None = None,
             enabled: bool = True) -> Iterable[T]:
    """A tqdm bar on rank 0 (stderr), the bare iterable elsewhere or when disabled."""
    if not (enabled and is_rank0()):
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, leave=False, disable=not bar_shown())
