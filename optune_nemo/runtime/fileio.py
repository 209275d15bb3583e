"""Atomic file and directory writes: what a kill at any moment must never leave half-written.

A file is written to a temporary sibling, flushed to disk and renamed over the target; a directory
is filled under a staging sibling and renamed into place (`staged_dir`). Readers see the old content or
the new one, never a mixture, and no temporary is mistaken for a result (a file's carries a `.tmp`
suffix; a directory's is hidden, `.<name>.tmp-<pid>`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

TMP_SUFFIX = ".tmp"


def fsync_path(path: str | Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; when the block succeeds the temporary is synced and
    renamed over `path`, when it raises the temporary is removed and `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def _remove(path: Path) -> None:
    """A leftover of a staged write, file or directory, gone as far as possible (the next writer retries)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _stage(final: Path, *, overwrite: bool, key: str) -> Path:
    """A fresh, empty staging directory beside `final`; refuses a non-empty `final` unless `overwrite`.
    Staging directories that a killed writer left beside `final` are removed first: one writer per
    `final` is the caller's contract (the run directory's lock, or the user's own --out)."""
    if final.exists() and (not final.is_dir() or any(final.iterdir())) and not overwrite:
        raise ValueError(f"{key}: {final} exists and is not empty; choose a new directory")
    if final.parent.is_dir():
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            _remove(stale)
    stage = final.parent / f".{final.name}.tmp-{os.getpid()}"
    stage.mkdir(parents=True)
    return stage


def _commit(stage: Path, final: Path) -> None:
    """`stage` renamed to `final`, replacing it. An existing `final` is first renamed aside (a directory
    cannot be renamed over a non-empty one), then deleted: a kill in between leaves no `final` at all or
    the new one, never a partial one, and the leftovers carry the staging pattern the next writer removes."""
    if final.exists():
        old = stage.with_name(stage.name + ".old")
        os.replace(final, old)
        os.replace(stage, final)
        _remove(old)
    else:
        os.replace(stage, final)


@contextlib.contextmanager
def staged_dir(final: str | Path, *, overwrite: bool = False, key: str = "--out") -> Iterator[Path]:
    """Yields an empty staging directory beside `final` to write into; when the block ends normally the
    stage becomes `final` (an existing one replaced), when it raises the stage is removed and `final` is
    untouched. A kill inside the block leaves `final` as it was and the stage behind, which the next
    `staged_dir` of the same `final` removes. Raises ValueError naming `key` (one line) when `final`
    exists, is not empty and `overwrite` is false."""
    final = Path(final)
    stage = _stage(final, overwrite=overwrite, key=key)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _commit(stage, final)
