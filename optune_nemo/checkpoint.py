"""Atomic, manifest-checked checkpoints of every Stateful part of a run.

Layout of `exp_dir/checkpoints/`:

    iter_000002/                the state after iteration 2 has finished
        model/                  policy model + optimizer + LR schedule (megatron dist_checkpointing, sharded)
        rollouts.parquet        the rollout store: one pair + rewards per prompt
        trainer_state.pt        next iteration, config, RNG states of every rank, component state
        manifest.json           every file above with size and sha256; written LAST
    latest                      the name of the newest complete checkpoint ("iter_000002")

A checkpoint is written into `iter_NNNNNN.tmp` and renamed when complete, then `latest` is replaced
atomically, so a crash at any moment leaves either the old or the new checkpoint as `latest`. At
resume the manifest is verified; a torn or corrupt checkpoint is skipped with a warning and the
previous complete one is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from optune_nemo.distributed import all_gather_object, broadcast_object

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
POINTER = "latest"
_PREFIX = "iter_"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    """This rank's host RNG states (python, numpy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _sha256(p)}
               for p in files}
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": entries}, indent=1))
    _fsync_file(tmp)
    os.replace(tmp, directory / MANIFEST)


def verify_manifest(directory: Path) -> str | None:
    """None when every file listed matches its size and checksum, else what is wrong."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return "no manifest (torn write)"
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable manifest: {e}"
    for rel, meta in entries.items():
        path = directory / rel
        if not path.is_file():
            return f"missing {rel}"
        if path.stat().st_size != meta["size"] or _sha256(path) != meta["sha256"]:
            return f"checksum mismatch in {rel}"
    return None


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    _fsync_file(tmp)
    os.replace(tmp, path)


class CheckpointManager:
    """Decides where checkpoints go, writes them atomically and finds the newest good one."""

    def __init__(self, exp_dir: str | Path, *, keep_last: int = 0):
        self.root = Path(exp_dir) / "checkpoints"
        self.keep_last = keep_last

    @staticmethod
    def name(iteration: int) -> str:
        return f"{_PREFIX}{iteration:06d}"

    def complete_checkpoints(self) -> list[Path]:
        """Renamed (i.e. fully written) checkpoint directories, oldest first."""
        if not self.root.is_dir():
            return []
        dirs = [p for p in self.root.iterdir()
                if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX):].isdigit()]
        return sorted(dirs, key=lambda p: int(p.name[len(_PREFIX):]))

    def latest_valid(self) -> Path | None:
        """The newest checkpoint whose manifest verifies; corrupt newer ones are skipped with a
        warning. (`latest` may lag one checkpoint behind after a kill between the rename and the
        pointer update: the directories, not the pointer, decide.) Rank 0 decides and broadcasts,
        so every rank resumes from the same place."""
        choice = None
        if _rank() == 0:
            for cand in self.complete_checkpoints()[::-1]:
                problem = verify_manifest(cand)
                if problem is None:
                    choice = str(cand)
                    break
                log.warning("checkpoint %s is not usable (%s); trying the previous one", cand, problem)
        choice = broadcast_object(choice)
        return Path(choice) if choice else None

    def save(self, iteration: int, *, save_model: Callable[[str], None],
             save_rank0: Callable[[Path], None], trainer_state: dict) -> Path:
        """Collective. `save_model(dir)` writes the sharded model on every rank; `save_rank0(dir)`
        writes rank-0 files (the rollout store); trainer_state gets every rank's RNG state added."""
        final = self.root / self.name(iteration)
        tmp = self.root / (self.name(iteration) + ".tmp")
        if _rank() == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        save_model(str(tmp / "model"))
        rngs = all_gather_object(rng_state())
        if _rank() == 0:
            save_rank0(tmp)
            torch.save({**trainer_state, "rng_states": rngs}, tmp / "trainer_state.pt")
            write_manifest(tmp)
            if final.exists():  # a stale copy from before a crash after rename but before pointer
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_text_atomic(self.root / POINTER, final.name + "\n")
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for old in self.complete_checkpoints()[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def load_trainer_state(directory: Path) -> dict:
        state = torch.load(directory / "trainer_state.pt", weights_only=False)
        rngs = state.pop("rng_states")
        if len(rngs) == (dist.get_world_size() if dist.is_initialized() else 1):
            set_rng_state(rngs[_rank()])
        else:
            log.warning("world size changed since the checkpoint (%d ranks then): host RNG states "
                        "are not restored", len(rngs))
        return state


class GenerationChunks:
    """Responses and rewards of an iteration in progress, persisted chunk by chunk under
    `exp_dir/partial/iter_NNNNNN/`, so a pre-emption during generation or scoring loses at most
    the chunk in flight. Chunks are only reused by the same iteration resumed from the checkpoint
    that precedes it (the one whose policy generated them); `reset_except` clears the rest."""

    def __init__(self, exp_dir: str | Path):
        self.root = Path(exp_dir) / "partial"

    def _dir(self, iteration: int) -> Path:
        return self.root / CheckpointManager.name(iteration)

    def reset_except(self, iteration: int | None) -> None:
        """Collective. Remove partial results of every iteration but `iteration`."""
        if _rank() == 0 and self.root.is_dir():
            for d in self.root.iterdir():
                if iteration is None or d.name != CheckpointManager.name(iteration):
                    shutil.rmtree(d, ignore_errors=True)
        _barrier()

    def existing(self, iteration: int) -> set[int]:
        """Collective: indices of the chunks already written for `iteration` (rank 0 decides)."""
        found = None
        if _rank() == 0:
            d = self._dir(iteration)
            found = sorted(int(p.stem.split("_")[1]) for p in d.glob("chunk_*.pt")) if d.is_dir() else []
        return set(broadcast_object(found))

    def load(self, iteration: int, index: int) -> dict:
        return torch.load(self._dir(iteration) / f"chunk_{index:05d}.pt", weights_only=False)

    def save(self, iteration: int, index: int, payload: dict) -> None:
        """Rank 0 writes atomically; the others have the same payload in memory."""
        if _rank() != 0:
            return
        d = self._dir(iteration)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f"chunk_{index:05d}.pt.tmp"
        torch.save(payload, tmp)
        _fsync_file(tmp)
        os.replace(tmp, d / f"chunk_{index:05d}.pt")
