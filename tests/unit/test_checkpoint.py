"""Checkpoint manager: atomic layout, manifest verification, fallback past torn checkpoints."""

import os
import random
import signal

import pytest
import torch

from optune_nemo.checkpoint import MANIFEST, CheckpointManager, GenerationChunks, verify_manifest
from optune_nemo.logging import MetricsWriter, read_metrics
from optune_nemo.preemption import PreemptionGuard


def _save(mgr, it, payload=b"weights"):
    def save_model(d):
        os.makedirs(d)
        with open(os.path.join(d, "shard_0.bin"), "wb") as f:
            f.write(payload)

    return mgr.save(it, save_model=save_model,
                    save_rank0=lambda d: (d / "rollouts.parquet").write_bytes(b"store%d" % it),
                    trainer_state={"next_iteration": it + 1})


def test_layout_and_pointer(tmp_path):
    mgr = CheckpointManager(tmp_path)
    path = _save(mgr, 0)
    assert path == tmp_path / "checkpoints" / "iter_000000"
    assert {p.name for p in path.iterdir()} == {"model", "rollouts.parquet", "trainer_state.pt", MANIFEST}
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "iter_000000"
    assert verify_manifest(path) is None
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    assert mgr.latest_valid() == path


def test_trainer_state_restores_rng(tmp_path):
    mgr = CheckpointManager(tmp_path)
    torch.manual_seed(3)
    random.seed(3)
    path = _save(mgr, 1)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(99)
    random.seed(99)
    state = mgr.load_trainer_state(path)
    assert state["next_iteration"] == 2
    got = (torch.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_manifest", "delete_file"])
def test_corrupt_latest_falls_back_with_warning(tmp_path, caplog, damage):
    mgr = CheckpointManager(tmp_path)
    first = _save(mgr, 0)
    second = _save(mgr, 1, payload=b"weights-of-iteration-1")
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
    mgr = CheckpointManager(tmp_path)
    first = _save(mgr, 0)

    def crash(d):
        os.makedirs(d)
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError):
        mgr.save(1, save_model=crash, save_rank0=lambda d: None, trainer_state={})
    assert mgr.latest_valid() == first
    _save(mgr, 1)   # a retry overwrites the stale temporary directory
    assert mgr.latest_valid().name == "iter_000001"


def test_keep_last(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for it in range(4):
        _save(mgr, it)
    assert [p.name for p in mgr.complete_checkpoints()] == ["iter_000002", "iter_000003"]


def test_no_checkpoint(tmp_path):
    assert CheckpointManager(tmp_path).latest_valid() is None


def test_generation_chunks(tmp_path):
    chunks = GenerationChunks(tmp_path)
    assert chunks.existing(3) == set()
    chunks.save(3, 0, {"prompt_ids": [1, 2]})
    chunks.save(3, 2, {"prompt_ids": [5]})
    chunks.save(4, 0, {"prompt_ids": [9]})
    assert chunks.existing(3) == {0, 2}
    assert chunks.load(3, 2) == {"prompt_ids": [5]}
    chunks.reset_except(3)
    assert chunks.existing(4) == set() and chunks.existing(3) == {0, 2}
    chunks.reset_except(None)
    assert chunks.existing(3) == set()


def test_metrics_truncate_on_resume(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=True, enabled=True)
    for it in range(3):
        w.write({"iteration": it, "loss": 0.5 + it, "regenerated": 4})
    w.truncate_from(2)
    w.write({"iteration": 2, "loss": 9.0, "regenerated": 4})
    w.close()
    assert [(r["iteration"], r["loss"]) for r in read_metrics(tmp_path)] == [(0, 0.5), (1, 1.5), (2, 9.0)]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_preemption_guard_single_process():
    guard = PreemptionGuard()
    assert not guard.requested()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert guard.requested()
    assert guard.requested()  # sticky
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_kill_between_rename_and_pointer_uses_newest(tmp_path):
    mgr = CheckpointManager(tmp_path)
    _save(mgr, 0)
    _save(mgr, 1)
    (tmp_path / "checkpoints" / "latest").write_text("iter_000000\n")   # pointer update lost
    assert mgr.latest_valid().name == "iter_000001"


def test_torn_metrics_line_is_dropped(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False, enabled=True)
    w.write({"iteration": 0, "loss": 1.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 1, "lo')
    w.truncate_from(1)
    assert read_metrics(tmp_path) == [{"iteration": 0, "loss": 1.0}]
