"""One task of a two-task `sbatch slurm/optune.sh` job SIGKILLed during training (the test also takes
`phase="generation"`, left out of CI for time): `srun --kill-on-bad-exit=1` ends the job within the bound
of docs/slurm.md ("When a rank dies or hangs"), the job fails (not requeued: only a pre-emption signal
requeues), no process of it is left, and the same command submitted again resumes and ends identical to
an uninterrupted job. The torchrun counterpart (both phases) and the hung rank:
tests/multiproc/test_rank_death.py."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from test_slurm import _metrics, _submit, _wait_state, cluster  # noqa: F401  (cluster: the autouse skip/fail)

pytestmark = pytest.mark.slurm

# test_slurm's TINY (6 x 2-prompt chunks in iteration 1 here) with two iterations and a training phase of
# a few seconds, so a kill placed on its first sign lands inside it
RUN = ["optune.rho=0.75", "optune.iterations=2", "train.micro_batch_size=1", "train.epochs_per_iteration=6"]
CHUNKS_ITER1 = 6
DEATH_BOUND_S = 60          # kill of one task -> the job has ended (measured: see docs/slurm.md)
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def _store(exp: Path) -> dict:
    import pyarrow.parquet as pq

    return pq.read_table(exp / "checkpoints" / "iter_000001" / "rollouts.parquet").to_pydict()


def _job_processes(exp: Path) -> dict[int, psutil.Process]:
    """The batch shell, srun and the tasks (their command lines name the unique exp_dir), and whatever the
    tasks started (megatron's checkpoint writer)."""
    found = {}
    for p in psutil.process_iter(["cmdline"]):
        if p.pid != os.getpid() and any(str(exp) in arg for arg in (p.info["cmdline"] or [])):
            found[p.pid] = p
            try:
                found.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
    return found


def _task(exp: Path, procid: int) -> psutil.Process:
    for p in _job_processes(exp).values():
        try:
            if p.cmdline()[:3] == [sys.executable, "-m", "optune_nemo.train"] and \
                    p.environ().get("SLURM_PROCID") == str(procid):
                return p
        except psutil.NoSuchProcess:
            pass
    raise AssertionError(f"no task {procid} of the job on exp_dir={exp}")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    base = tmp_path_factory.mktemp("slurm-death-ref")
    job = _submit(base / "run", base / "out.txt", *RUN)
    info = _wait_state(job, ENDED)
    assert info["JobState"] == "COMPLETED", (base / "out.txt").read_text()[-3000:]
    return base / "run"


@pytest.mark.parametrize("phase", ["generation", "training"])
def test_killed_task_ends_the_job_and_the_resubmitted_job_is_identical(uninterrupted, tmp_path, phase):
    exp, out = tmp_path / "run", tmp_path / "out.txt"
    job = _submit(exp, out, *RUN)
    chunk = exp / "partial" / "iter_000001" / "chunk_00000.json"
    text = lambda: out.read_text(errors="replace") if out.exists() else ""  # noqa: E731
    ready = chunk.is_file if phase == "generation" else (lambda: "iteration 1: phase=train" in text())
    seen, deadline = {}, time.monotonic() + 600
    try:
        while not ready():
            assert time.monotonic() < deadline, f"no {phase} of iteration 1 in 600 s:\n{text()[-3000:]}"
            seen.update(_job_processes(exp))
            time.sleep(0.02)
        victim = _task(exp, 1)
        seen.update(_job_processes(exp))
        killed = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        info = _wait_state(job, ENDED, timeout=DEATH_BOUND_S + 60)
        took = time.monotonic() - killed
    finally:
        subprocess.run(["scancel", job], capture_output=True)      # a failing test leaves no job behind
    assert info["JobState"] == "FAILED" and info.get("ExitCode") != "0:0", (info, text()[-3000:])
    assert took < DEATH_BOUND_S, f"the job ended {took:.1f} s after the kill"
    _, alive = psutil.wait_procs(list(seen.values()), timeout=5)
    left = [(p.pid, p.cmdline()) for p in {*alive, *_job_processes(exp).values()} if p.is_running()]
    assert not left, left
    assert info.get("Restarts", "0") == "0" and "requeueing" not in text()
    # the kill landed in the phase it was meant for
    assert not (exp / "checkpoints" / "iter_000001").exists()
    assert [r["iteration"] for r in _metrics(exp)] == [0]
    if phase == "generation":
        assert 1 <= len(list(chunk.parent.glob("chunk_*.json"))) < CHUNKS_ITER1
        assert "iteration 1: phase=reference" not in text()
    rerun = _submit(exp, tmp_path / "rerun.txt", *RUN)
    info = _wait_state(rerun, ENDED)
    rerun_text = (tmp_path / "rerun.txt").read_text(errors="replace")
    assert info["JobState"] == "COMPLETED", rerun_text[-3000:]
    assert "resuming from" in rerun_text and "iter_000000" in rerun_text
    assert _store(exp) == _store(uninterrupted)
    assert _metrics(exp) == _metrics(uninterrupted)
