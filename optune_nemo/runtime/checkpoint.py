"""Atomic, manifest-checked checkpoints of every stateful part of a run.

Layout of `exp_dir/checkpoints/`:

    iter_000002/                the state after iteration 2 has finished
        model/                  policy model + optimizer (megatron dist_checkpointing, sharded)
        rollouts.parquet        the rollout store: one pair + rewards per prompt
        trainer_state.yaml      next iteration and the run's configuration
        rng_states.pt           every rank's RNG states (tensors only: loaded with weights_only=True)
        metrics.jsonl           the metrics records of iterations 0..2 (what exp_dir/metrics.jsonl holds)
        manifest.json           every file above with size and sha256; written LAST
    latest                      the name of the newest complete checkpoint ("iter_000002")

What goes in is a registry of parts (`CheckpointManager.register(name, part)`), each with `save(dir)` and
`load(dir)`; the manager owns where and when. A checkpoint is written into `iter_NNNNNN.tmp` and renamed
when complete, then `latest` is replaced atomically, so a crash at any moment leaves either the old or
the new checkpoint as the newest complete one. At resume the manifest is verified; a torn or corrupt
checkpoint is skipped with a warning and the previous complete one is used.

Nothing is unpickled from a checkpoint: configuration and records are YAML/JSON, tensors are read with
`torch.load(weights_only=True)`, and the model's dist-checkpoint metadata (a pickle written by
torch.distributed.checkpoint) is screened first (`policy.safe_unpickle`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from optune_nemo.errors import CheckpointError, ConfigError, StorageError, first_line  # noqa: F401  (re-exported)
from optune_nemo.runtime.distributed import all_gather_object, barrier, broadcast_object, global_rank
from optune_nemo.runtime.fileio import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
POINTER = "latest"
_PREFIX = "iter_"


# --------------------------------------------------------------------------- manifest


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
    write_json_atomic(directory / MANIFEST, {"files": entries})


def manifest_bytes(directory: Path) -> int:
    """The size of a checkpoint's files as its manifest lists them (0 without a readable manifest)."""
    try:
        return sum(meta["size"] for meta in json.loads((directory / MANIFEST).read_text())["files"].values())
    except (OSError, ValueError, KeyError):
        return 0


def verify_manifest(directory: Path) -> str | None:
    """None when every file listed matches its size and checksum, else what is wrong (naming the file)."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return f"{manifest}: missing (the checkpoint was not completely written)"
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"{manifest}: unreadable ({first_line(e)})"
    for rel, meta in entries.items():
        path = directory / rel
        if not path.is_file():
            return f"{path}: missing (listed in the manifest)"
        if path.stat().st_size != meta["size"] or _sha256(path) != meta["sha256"]:
            return f"{path}: damaged (size or checksum differs from the manifest)"
    return None


def checkpoint_problem(directory: Path) -> str | None:
    """None when `directory` is a complete checkpoint that is safe to load, else what is wrong with which
    file: the manifest verifies, every `*.pt` loads with the weights-only loader (megatron's `common.pt`,
    sharded objects, the RNG states), and every dist-checkpoint `.metadata` unpickles with checkpoint
    metadata's globals only. Reads every small file once; the tensor shards are covered by the checksums."""
    from optune_nemo.runtime.safe_unpickle import check_dist_checkpoint

    directory = Path(directory)
    if not directory.is_dir():
        return f"{directory}: not a checkpoint directory"
    problem = verify_manifest(directory)
    if problem is not None:
        return problem
    try:
        for pt in sorted(directory.rglob("*.pt")):
            load_tensors(pt)
        for meta in sorted(directory.rglob(".metadata")):
            check_dist_checkpoint(meta.parent)
    except CheckpointError as e:
        return str(e)
    return None


# --------------------------------------------------------------------------- RNG states as tensors


def rng_state() -> dict:
    """This rank's host RNG states (python, numpy, torch CPU and CUDA) as tensors and plain values,
    loadable with `torch.load(weights_only=True)`."""
    version, py_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_tensors(path: Path):
    """`torch.load(path, weights_only=True)`: tensors and plain containers only, never arbitrary objects."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:   # UnpicklingError for a planted object, others for a damaged file
        raise CheckpointError(f"{path}: not a tensors-only file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); refusing to load it") from None


# --------------------------------------------------------------------------- the manager


class CheckpointPart(Protocol):
    """A stateful part of a run. Both methods are collective (every rank calls them)."""

    def save(self, directory: Path) -> None:
        ...

    def load(self, directory: Path) -> None:
        ...


class RngStates:
    """Every rank's host RNG states in `rng_states.pt`."""

    FILE = "rng_states.pt"

    def save(self, directory: Path) -> None:
        states = all_gather_object(rng_state())
        if global_rank() == 0:
            torch.save(states, directory / self.FILE)

    def load(self, directory: Path) -> None:
        states = load_tensors(directory / self.FILE)
        world = dist.get_world_size() if dist.is_initialized() else 1
        if len(states) == world:
            set_rng_state(states[global_rank()])
        else:
            log.warning("world size changed since the checkpoint (%d ranks then): host RNG states are not "
                        "restored", len(states))


class CheckpointManager:
    """Decides where checkpoints go, writes every registered part atomically and finds the newest good one."""

    def __init__(self, exp_dir: str | Path, *, keep_last: int = 0):
        self.root = Path(exp_dir) / "checkpoints"
        self.keep_last = keep_last
        self.parts: dict[str, CheckpointPart] = {}

    def register(self, name: str, part: CheckpointPart) -> None:
        """Parts are saved and loaded in registration order."""
        if name in self.parts:
            raise ValueError(f"checkpoint part {name!r} registered twice")
        self.parts[name] = part

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
        """The newest checkpoint that is complete and safe to load (`checkpoint_problem`); a damaged newer one
        is skipped with a warning naming the file. None when there is no checkpoint at all; CheckpointError
        when there are checkpoints but none is usable (starting over would silently drop the run's
        progress). (`latest` may lag one checkpoint behind after a kill between the rename and the pointer
        update: the directories, not the pointer, decide.) Rank 0 decides and broadcasts, so every rank
        resumes from the same place."""
        choice = None
        if global_rank() == 0:
            found = self.complete_checkpoints()[::-1]
            first_problem = None
            for cand in found:
                problem = checkpoint_problem(cand)
                if problem is None:
                    choice = str(cand)
                    break
                first_problem = first_problem or problem
                log.warning("checkpoint %s is not usable (%s); falling back to the previous one", cand.name, problem)
            if choice is None and found:
                choice = ("error", f"no usable checkpoint in {self.root}; the newest: {first_problem} (move the "
                          "damaged checkpoints away to resume from an older one, or start in a new exp_dir)")
        choice = broadcast_object(choice)
        if isinstance(choice, (tuple, list)):
            raise CheckpointError(choice[1])
        return Path(choice) if choice else None

    def checked(self, directory: str | Path) -> Path:
        """`directory` when it is a checkpoint that is complete and safe to load, else CheckpointError
        naming the file (for `resume=<path>` and `init_from`, where no fallback is wanted). Collective."""
        problem = broadcast_object(checkpoint_problem(Path(directory)) if global_rank() == 0 else None)
        if problem is not None:
            raise CheckpointError(problem)
        return Path(directory)

    def room_problem(self) -> str | None:
        """Why the next checkpoint would not fit, judged by the size of the newest one (the next is as
        large) against the free space, with 5 % to spare; None when it fits or nothing is written yet."""
        done = self.complete_checkpoints()
        if not done:
            return None
        need, free = manifest_bytes(done[-1]), shutil.disk_usage(self.root).free
        if free >= 1.05 * need:
            return None
        gib = 2.0 ** 30
        return (f"{self.root}: {free / gib:.2f} GiB free, the last checkpoint took {need / gib:.2f} GiB; free "
                "space (checkpoint.keep_last bounds how many are kept) and rerun the same command to resume")

    def save(self, iteration: int) -> Path:
        """Collective: every part into `iter_NNNNNN.tmp`, the manifest, then the rename and `latest`.
        Refused (StorageError on every rank, nothing written) when the file system has no room for it."""
        final = self.root / self.name(iteration)
        self.root.mkdir(parents=True, exist_ok=True)
        rank0 = global_rank() == 0
        problem = broadcast_object(self.room_problem() if rank0 else None)
        if problem:
            raise StorageError(problem)
        tmp = final.with_name(final.name + ".tmp")
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        barrier()
        for part in self.parts.values():
            part.save(tmp)
        barrier()
        if rank0:
            write_manifest(tmp)
            if final.exists():  # a stale copy from before a crash after rename but before pointer
                shutil.rmtree(final)
            tmp.rename(final)
            write_text_atomic(self.root / POINTER, final.name + "\n")
            self._prune()
        barrier()
        return final

    def restore(self, directory: Path) -> None:
        """Collective: every registered part from `directory`."""
        for part in self.parts.values():
            part.load(directory)

    def start(self, *, resume: str, init_from: str | Path | None = None,
              logger: logging.Logger = log) -> Path | None:
        """Where a run starts, restored into the registered parts; returns the checkpoint restored, or None for a
        fresh start. `resume`: `auto` (the newest usable checkpoint of this run: a damaged newer one is skipped
        with a warning), `never` (ConfigError when this run already holds checkpoints) or a checkpoint
        directory (CheckpointError naming the file when it is not usable). With none of its own, `init_from`
        (another run's checkpoint, screened like a named one) is restored instead and recorded in
        exp_dir/fork.json. Every checkpoint is screened before anything is loaded (`checkpoint_problem`).
        Collective."""
        if resume == "never":
            if self.complete_checkpoints():
                raise ConfigError(f"resume: never, but {self.root} already holds checkpoints; "
                                  "use resume=auto or another exp_dir")
            directory = None
        else:
            directory = self.checked(resume) if resume != "auto" else self.latest_valid()
        if directory is not None:
            logger.info("resuming from %s", directory)
            self.restore(directory)
            return directory
        if init_from is None:
            return None
        source = self.checked(Path(init_from).expanduser().resolve())
        logger.info("starting from %s (init_from)", source)
        self.restore(source)
        if global_rank() == 0:
            write_json_atomic(self.root.parent / "fork.json",
                              {"init_from": str(source), "iteration": int(source.name[len(_PREFIX):])})
        return source

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for old in self.complete_checkpoints()[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- generation chunks


class GenerationChunks:
    """Responses and rewards of an iteration in progress, persisted chunk by chunk as JSON under
    `exp_dir/partial/iter_NNNNNN/`, so a pre-emption during generation or scoring loses at most the
    chunk in flight. Chunks are only reused by the same iteration resumed from the checkpoint that
    precedes it (the one whose policy generated them); `reset_except` clears the rest."""

    def __init__(self, exp_dir: str | Path):
        self.root = Path(exp_dir) / "partial"

    def _dir(self, iteration: int) -> Path:
        return self.root / CheckpointManager.name(iteration)

    def reset_except(self, iteration: int | None) -> None:
        """Collective. Remove partial results of every iteration but `iteration`."""
        if global_rank() == 0 and self.root.is_dir():
            for d in self.root.iterdir():
                if iteration is None or d.name != CheckpointManager.name(iteration):
                    shutil.rmtree(d, ignore_errors=True)
        barrier()

    def existing(self, iteration: int) -> set[int]:
        """Collective: indices of the chunks already written for `iteration` (rank 0 decides)."""
        found = None
        if global_rank() == 0:
            d = self._dir(iteration)
            found = sorted(int(p.stem.split("_")[1]) for p in d.glob("chunk_*.json")) if d.is_dir() else []
        return set(broadcast_object(found))

    def load(self, iteration: int, index: int) -> dict | None:
        """The chunk's payload (plain JSON values), or None when it cannot be read (then it is redone)."""
        path = self._dir(iteration) / f"chunk_{index:05d}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            log.warning("generation chunk %s is unreadable (%s): generating it again", path, e)
            return None

    def save(self, iteration: int, index: int, payload: dict) -> None:
        """Rank 0 writes atomically; the others have the same payload in memory."""
        if global_rank() != 0:
            return
        d = self._dir(iteration)
        d.mkdir(parents=True, exist_ok=True)
        write_json_atomic(d / f"chunk_{index:05d}.json", payload)


