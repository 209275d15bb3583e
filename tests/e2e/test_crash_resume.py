"""SIGKILL at any moment, then a plain resume, ends identical to an uninterrupted run: killed
during generation (between persisted chunks), during training, in the middle of writing a
checkpoint, and at random wall-clock moments."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from dist_utils import run_ranks
from test_optune_loop import E2E, _metrics, _store, _train_cli, _weights_pair

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]

# Runs the real entry point with one component wrapped so the process SIGKILLs itself at a chosen
# point of iteration 1 (a kill -9 from outside, placed deterministically).
_CRASHER = textwrap.dedent("""
    import os, signal, sys
    from optune_nemo.config import load_config
    from optune_nemo import train
    where, exp_dir, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    cfg = train.check_inputs(load_config([*overrides, f"exp_dir={exp_dir}"]), world_size=1)
    loop = train.build_loop(cfg).loop
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    calls = {"generate": 0}
    if where == "generation":
        real = loop.engine.generate
        def generate(*a, **k):
            calls["generate"] += 1
            if loop.next_iteration == 1 and calls["generate"] == 5:   # 3 chunks in iteration 0, 2 done in 1
                die()
            return real(*a, **k)
        loop.engine.generate = generate
    elif where == "training":
        real = loop.policy.train
        def train_and_die(*a, **k):
            out = real(*a, **k)
            if loop.next_iteration == 1:
                die()
            return out
        loop.policy.train = train_and_die
    elif where == "metrics":
        real = loop.metrics.flush
        def flush_or_die():
            if loop.next_iteration == 2:      # iteration 1 is checkpointed; its record not yet written
                die()
            real()
        loop.metrics.flush = flush_or_die
    elif where == "checkpoint":
        real = loop.policy.save_checkpoint
        def save_and_die(d):
            real(d)
            if loop.next_iteration == 2:      # iteration 1's checkpoint: model written, the rest not
                die()
        loop.policy.save_checkpoint = save_and_die
    loop.fit()
""")


def _run_in_session(cmd, log, *, trigger=None, timeout=600):
    """Run in a new session, logging to a file. `trigger(proc)` runs while it does (to signal it);
    afterwards the whole group is killed, so a failing test leaves no process behind. Returns the
    exit code."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=out, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        if trigger is not None:
            trigger(proc)
        return proc.wait(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill_after(delay):
    def trigger(proc):
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    return trigger


def _crash(exp_dir, where):
    log = exp_dir.parent / f"crash-{where}.log"
    rc = _run_in_session([sys.executable, "-c", _CRASHER, where, str(exp_dir), *E2E], log)
    assert rc == -signal.SIGKILL, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    exp = tmp_path_factory.mktemp("ref")
    _train_cli(exp)
    return exp


def _assert_same(a, b):
    assert _store(a) == _store(b)
    assert _metrics(a) == _metrics(b)
    wa, wb = run_ranks(_weights_pair, 1, str(a), str(b))[0]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("where", ["generation", "training", "checkpoint", "metrics"])
def test_kill_then_resume_is_identical(reference, tmp_path, where):
    exp = tmp_path / "run"
    _crash(exp, where)
    if where == "metrics":   # the kill window between a checkpoint and its metrics record
        assert (exp / "checkpoints" / "iter_000001").is_dir()
        assert [r["iteration"] for r in _metrics(exp)] == [0]
    if where == "generation":
        chunks = list((exp / "partial" / "iter_000001").glob("chunk_*.json"))
        assert len(chunks) == 1, "the chunk finished before the kill must be on disk"
    if where == "checkpoint":
        assert (exp / "checkpoints" / "iter_000001.tmp").is_dir()
        assert not (exp / "checkpoints" / "iter_000001").exists()
    assert not (exp / "COMPLETED").exists()
    _train_cli(exp)
    assert (exp / "COMPLETED").exists()
    _assert_same(reference, exp)
    assert [r["iteration"] for r in _metrics(exp)] == [0, 1, 2]     # every iteration exactly once


def test_kill_at_random_moments(reference, tmp_path):
    exp, rng = tmp_path / "run", random.Random(1234)
    cmd = [sys.executable, "-m", "optune_nemo.train", *E2E, f"exp_dir={exp}"]
    for delay in sorted(rng.uniform(5.0, 12.0) for _ in range(3)):
        _run_in_session(cmd, tmp_path / "kills.log", trigger=_kill_after(delay))
    _train_cli(exp)
    _assert_same(reference, exp)


def _preempt_when(log: Path, needle: str, cmd, timeout: float = 300) -> int:
    """Start the run, send SIGUSR1 once `needle` appears in its log, return its exit code."""
    def trigger(proc):
        deadline = time.time() + timeout
        while needle not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"run ended before {needle!r}:\n{log.read_text()[-2000:]}"
            assert time.time() < deadline, f"no {needle!r} in {timeout} s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)

    return _run_in_session(cmd, log, trigger=trigger, timeout=timeout)


@pytest.mark.parametrize("needle", ["iteration 1: phase=generation", "iteration 1: phase=train"],
                         ids=["during-generation", "during-training"])
def test_preemption_signal_stops_cleanly_and_resumes_identically(reference, tmp_path, needle):
    """SIGUSR1 (Slurm's pre-emption warning): the run stops at the next safe point with exit code 0
    and without COMPLETED; the rerun resumes by itself and ends identical to an uninterrupted run."""
    exp = tmp_path / "run"
    cmd = [sys.executable, "-m", "optune_nemo.train", *E2E, f"exp_dir={exp}"]
    assert _preempt_when(tmp_path / "run.log", needle, cmd) == 0
    assert not (exp / "COMPLETED").exists()
    assert "stop requested" in (tmp_path / "run.log").read_text()
    if "train" in needle:   # training finishes its iteration, which is then checkpointed
        assert (exp / "checkpoints" / "iter_000001").is_dir()
    _train_cli(exp)
    assert (exp / "COMPLETED").exists()
    _assert_same(reference, exp)


def test_killed_run_leaves_no_process(tmp_path):
    """SIGKILL of the run (only the run's own process, as the OOM killer or `kill -9 PID` does): none of
    the processes it started survives it (megatron's checkpoint writer starts a helper server)."""
    import psutil

    exp = tmp_path / "run"
    cmd = [sys.executable, "-m", "optune_nemo.train", *E2E, f"exp_dir={exp}"]

    def trigger(proc):
        deadline = time.time() + 300
        while not (exp / "checkpoints" / "iter_000000").is_dir():   # the helper exists after a save
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "expected the checkpoint writer's helper process"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, [(p.pid, p.cmdline()) for p in alive]

    _run_in_session(cmd, tmp_path / "run.log", trigger=trigger)
