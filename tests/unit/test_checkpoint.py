"""Checkpoint manager: registry of parts, atomic layout, manifest verification, fallback past torn
checkpoints, tensors-only loading, metrics committed with the checkpoint."""

import os
import pickle
import random
import signal

import pytest
import torch

from optune_nemo.runtime.checkpoint import (
    MANIFEST,
    CheckpointError,
    CheckpointManager,
    GenerationChunks,
    RngStates,
    StorageError,
    checkpoint_problem,
    verify_manifest,
    write_manifest,
)
from optune_nemo.runtime.metrics import MetricsWriter, read_metrics
from optune_nemo.runtime.preemption import PreemptionGuard


class FileParts:
    """A model-like part (a directory of shards) and a store-like part (one file), with what they read."""

    def __init__(self, payload=b"weights"):
        self.payload, self.loaded = payload, {}

    def save(self, d):
        os.makedirs(d / "model")
        (d / "model" / "shard_0.bin").write_bytes(self.payload)
        (d / "rollouts.parquet").write_bytes(b"store")

    def load(self, d):
        self.loaded = {"model": (d / "model" / "shard_0.bin").read_bytes(),
                       "store": (d / "rollouts.parquet").read_bytes()}


def _manager(tmp_path, payload=b"weights", **kw):
    mgr = CheckpointManager(tmp_path, **kw)
    mgr.register("files", FileParts(payload))
    mgr.register("rng", RngStates())
    return mgr


def test_layout_and_pointer(tmp_path):
    mgr = _manager(tmp_path)
    path = mgr.save(0)
    assert path == tmp_path / "checkpoints" / "iter_000000"
    assert {p.name for p in path.iterdir()} == {"model", "rollouts.parquet", "rng_states.pt", MANIFEST}
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "iter_000000"
    assert verify_manifest(path) is None
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    assert mgr.latest_valid() == path


def test_parts_are_restored_in_order(tmp_path):
    order = []

    class Part:
        def __init__(self, name):
            self.name = name

        def save(self, d):
            (d / self.name).write_text(self.name)

        def load(self, d):
            order.append((d / self.name).read_text())

    mgr = CheckpointManager(tmp_path)
    for name in ("a", "b", "c"):
        mgr.register(name, Part(name))
    with pytest.raises(ValueError, match="twice"):
        mgr.register("a", Part("a"))
    mgr.restore(mgr.save(0))
    assert order == ["a", "b", "c"]


def test_rng_states_restore(tmp_path):
    mgr = _manager(tmp_path)
    torch.manual_seed(3)
    random.seed(3)
    import numpy as np

    np.random.seed(3)
    path = mgr.save(1)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    mgr.restore(path)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1] and got[2] == expected[2]


class _Payload:
    """Unpickling this runs code: what a planted checkpoint file would do."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_planted_pickle_payload_is_refused(tmp_path, monkeypatch):
    mgr = _manager(tmp_path)
    path = mgr.save(0)
    (path / "rng_states.pt").write_bytes(pickle.dumps([{"torch": _Payload()}]))
    write_manifest(path)                              # a consistent, but hostile, checkpoint
    monkeypatch.chdir(tmp_path)
    for refuse in (mgr.restore, mgr.checked, lambda p: mgr.latest_valid()):   # loaded, named, or found
        with pytest.raises(CheckpointError) as e:
            refuse(path)
        assert "rng_states.pt" in str(e.value) and "not a tensors-only file" in str(e.value)
        assert "\n" not in str(e.value)
    assert "no usable checkpoint" in str(e.value)     # resume=auto does not start over silently
    assert not (tmp_path / "PWNED").exists()


def test_hostile_newest_falls_back_to_the_previous(tmp_path, caplog):
    first = _manager(tmp_path).save(0)
    second = _manager(tmp_path).save(1)
    (second / "rng_states.pt").write_bytes(pickle.dumps([{"torch": _Payload()}]))
    write_manifest(second)
    assert checkpoint_problem(first) is None and "rng_states.pt" in checkpoint_problem(second)
    assert _manager(tmp_path).latest_valid() == first
    assert "iter_000001 is not usable" in caplog.text and "rng_states.pt" in caplog.text


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_manifest", "delete_file"])
def test_corrupt_latest_falls_back_with_warning(tmp_path, caplog, damage):
    first = _manager(tmp_path).save(0)
    mgr = _manager(tmp_path, payload=b"weights-of-iteration-1")
    second = mgr.save(1)
    shard = second / "model" / "shard_0.bin"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:5])
    elif damage == "flip":
        data = bytearray(shard.read_bytes())
        data[0] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "delete_manifest":
        (second / MANIFEST).unlink()
    else:
        (second / "rollouts.parquet").unlink()
    assert verify_manifest(second) is not None
    assert mgr.latest_valid() == first
    assert "not usable" in caplog.text


def test_torn_write_leaves_previous_latest(tmp_path):
    first = _manager(tmp_path).save(0)

    class Crash:
        def save(self, d):
            os.makedirs(d / "model")
            raise RuntimeError("killed while writing")

    broken = CheckpointManager(tmp_path)
    broken.register("crash", Crash())
    with pytest.raises(RuntimeError):
        broken.save(1)
    mgr = _manager(tmp_path)
    assert mgr.latest_valid() == first
    mgr.save(1)   # a retry overwrites the stale temporary directory
    assert mgr.latest_valid().name == "iter_000001"


def test_keep_last(tmp_path):
    mgr = _manager(tmp_path, keep_last=2)
    for it in range(4):
        mgr.save(it)
    assert [p.name for p in mgr.complete_checkpoints()] == ["iter_000002", "iter_000003"]


def test_no_room_for_the_next_checkpoint_is_refused_before_writing(tmp_path, monkeypatch):
    from collections import namedtuple

    from optune_nemo.runner import _run
    from optune_nemo.runtime import checkpoint as ckpt

    mgr = _manager(tmp_path, payload=b"w" * 100_000)
    first = mgr.save(0)
    size = sum(f.stat().st_size for f in first.rglob("*") if f.is_file())   # independent of the manifest
    usage = namedtuple("usage", "total used free")
    free = {"bytes": size}                                            # < 1.05 x the last checkpoint
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: usage(10 * size, 9 * size, free["bytes"]))
    with pytest.raises(StorageError, match=r"GiB free, the last checkpoint took"):
        mgr.save(1)
    assert [p.name for p in mgr.complete_checkpoints()] == ["iter_000000"]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))       # nothing of iteration 1 written
    assert mgr.latest_valid() == first
    lines = []
    assert _run(lambda: mgr.save(1), lines.append, None, "optune_nemo") == 1   # one line, exit 1
    assert len(lines) == 1 and "rerun the same command to resume" in lines[0]
    free["bytes"] = 2 * size                                          # room again: the save goes through
    assert mgr.save(1).name == "iter_000001"


def test_no_checkpoint(tmp_path):
    assert CheckpointManager(tmp_path).latest_valid() is None


def test_kill_between_rename_and_pointer_uses_newest(tmp_path):
    mgr = _manager(tmp_path)
    mgr.save(0)
    mgr.save(1)
    (tmp_path / "checkpoints" / "latest").write_text("iter_000000\n")   # pointer update lost
    assert mgr.latest_valid().name == "iter_000001"


def test_generation_chunks_are_json(tmp_path):
    chunks = GenerationChunks(tmp_path)
    assert chunks.existing(3) == set()
    chunks.save(3, 0, {"prompt_ids": [1, 2], "rewards": [[0.1, -0.30000000000000004]]})
    chunks.save(3, 2, {"prompt_ids": [5]})
    chunks.save(4, 0, {"prompt_ids": [9]})
    assert chunks.existing(3) == {0, 2}
    assert chunks.load(3, 0) == {"prompt_ids": [1, 2], "rewards": [[0.1, -0.30000000000000004]]}   # exact floats
    assert (tmp_path / "partial" / "iter_000003" / "chunk_00000.json").is_file()
    (tmp_path / "partial" / "iter_000003" / "chunk_00002.json").write_text('{"prompt_ids": [5')   # torn
    assert chunks.load(3, 2) is None                                  # redone, never trusted
    chunks.reset_except(3)
    assert chunks.existing(4) == set() and chunks.existing(3) == {0, 2}
    chunks.reset_except(None)
    assert chunks.existing(3) == set()


# --------------------------------------------------------------------------- metrics


def test_metrics_record_is_committed_with_its_checkpoint(tmp_path):
    """A kill after iteration 1's checkpoint but before metrics.jsonl got its record: the resume writes it."""
    w = MetricsWriter(tmp_path, tensorboard=True, enabled=True)
    mgr = CheckpointManager(tmp_path)
    mgr.register("metrics", w)
    for it in range(2):
        w.add({"iteration": it, "loss": 0.5 + it})
        mgr.save(it)
        if it == 0:
            w.flush()
    # killed here: iteration 1 is checkpointed, metrics.jsonl has only iteration 0
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [0]
    resumed = MetricsWriter(tmp_path, tensorboard=True, enabled=True)
    fresh = CheckpointManager(tmp_path)
    fresh.register("metrics", resumed)
    fresh.restore(fresh.latest_valid())
    assert read_metrics(tmp_path) == [{"iteration": 0, "loss": 0.5}, {"iteration": 1, "loss": 1.5}]
    resumed.add({"iteration": 2, "loss": 2.5})
    resumed.flush()
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [0, 1, 2]


def test_metrics_of_iterations_after_the_checkpoint_are_dropped(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False, enabled=True)
    mgr = CheckpointManager(tmp_path)
    mgr.register("metrics", w)
    w.add({"iteration": 0, "loss": 1.0})
    first = mgr.save(0)
    w.flush()
    w.add({"iteration": 1, "loss": 2.0})
    w.flush()                                     # a record written, then its checkpoint was lost
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 2, "lo')           # and a line torn by a kill
    again = MetricsWriter(tmp_path, tensorboard=False, enabled=True)
    again.load(first)
    assert read_metrics(tmp_path) == [{"iteration": 0, "loss": 1.0}]


def test_start_fresh_empties_metrics(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False, enabled=True)
    w.add({"iteration": 0, "loss": 1.0})
    w.flush()
    MetricsWriter(tmp_path, tensorboard=False, enabled=True).start_fresh()
    assert read_metrics(tmp_path) == []


def test_preemption_guard_single_process():
    guard = PreemptionGuard()
    assert not guard.requested()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert guard.requested()
    assert guard.requested()  # sticky
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
