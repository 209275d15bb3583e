"""One writer per run directory (`rundir.hold_run_dir`): a second process is refused with the holder named,
the lock is gone the moment its holder dies (SIGKILL included), a refused or failing start never removes
the holder's files, and a file system without locks is said to be unprotected."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from optune_nemo.errors import ConfigError, RunDirBusy
from optune_nemo.runtime import rundir
from optune_nemo.runtime.rundir import LOCK_FILE, RunDir, hold_run_dir, holds_run_dir, release_run_dir

HOLDER = textwrap.dedent("""
    import sys, time
    from optune_nemo.runtime.rundir import hold_run_dir
    hold_run_dir(sys.argv[1])
    print("held", flush=True)
    time.sleep(120)
""")


@pytest.fixture
def holder(tmp_path):
    """Another process that holds tmp_path/run, started with a Slurm job id in its environment."""
    exp = tmp_path / "run"
    env = {**os.environ, "SLURM_JOB_ID": "4242"}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(exp)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    yield exp, proc
    proc.kill()
    proc.wait()


def test_second_writer_is_refused_naming_the_holder(holder):
    exp, proc = holder
    (exp / "metrics.jsonl").write_text("the holder's record\n")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in exp.iterdir())
    with pytest.raises(RunDirBusy) as e:
        hold_run_dir(exp)
    line = str(e.value)
    assert "\n" not in line and str(exp) in line
    assert f"host {socket.gethostname()}, pid {proc.pid}, Slurm job 4242" in line
    assert sorted((p.name, p.stat().st_mtime_ns) for p in exp.iterdir()) == before     # nothing written
    assert not holds_run_dir(exp)


def test_the_lock_dies_with_its_holder(holder):
    exp, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    t0 = time.monotonic()
    hold_run_dir(exp)                        # no stale lock to clean up by hand
    assert time.monotonic() - t0 < 1.0
    assert holds_run_dir(exp)
    assert json.loads((exp / LOCK_FILE).read_text())["pid"] == os.getpid()
    release_run_dir(exp)
    assert not holds_run_dir(exp)


def test_a_refused_start_removes_nothing_of_the_holder(holder):
    """A ConfigError raised before this invocation took the lock (it wrote nothing) must not let RunDir
    clean up files that belong to the run holding the directory."""
    exp, _ = holder
    with pytest.raises(ConfigError):
        with RunDir(exp, rank=0):
            (exp / "written_by_the_holder_meanwhile").write_text("x")
            raise ConfigError("data.path: malformed")
    assert (exp / "written_by_the_holder_meanwhile").exists()


def test_what_the_holder_created_is_removed_on_its_config_error(tmp_path):
    exp = tmp_path / "run"
    with pytest.raises(ConfigError):
        with RunDir(exp, rank=0):
            hold_run_dir(exp)
            (exp / "config.yaml").write_text("x")
            raise ConfigError("reward.function: returned NaN")
    assert not exp.exists() and not holds_run_dir(exp)


def test_reentrant_in_one_process(tmp_path):
    hold_run_dir(tmp_path / "run")
    hold_run_dir(tmp_path / "run")           # a second build in one process (tests, a resumed loop)
    assert holds_run_dir(tmp_path / "run")
    release_run_dir(tmp_path / "run")


def test_file_system_without_locks_warns_and_goes_on(tmp_path, monkeypatch, caplog):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(rundir.fcntl, "flock", no_locks)
    hold_run_dir(tmp_path / "run")
    assert "does not support file locks" in caplog.text
    assert holds_run_dir(tmp_path / "run")   # the run is still the one that cleans up after itself
    release_run_dir(tmp_path / "run")


def _two_ranks_try(rank, exp_dir):
    import torch.distributed as tdist

    tdist.init_process_group("gloo")
    try:
        hold_run_dir(exp_dir, rank=rank)
        outcome = "held"
    except RunDirBusy as e:
        outcome = str(e)
    tdist.barrier()
    mine = holds_run_dir(exp_dir)
    tdist.destroy_process_group()
    return outcome, mine


def test_every_rank_of_a_job_learns_the_refusal(holder):
    """Rank 0 holds the lock for the job; when another process has it, rank 1 is refused as well
    (it would otherwise go on and wait in the first collective)."""
    from dist_utils import run_ranks

    exp, proc = holder
    outcomes = run_ranks(_two_ranks_try, 2, str(exp))
    assert [o[1] for o in outcomes] == [False, False]
    assert all(f"pid {proc.pid}" in o[0] for o in outcomes), outcomes


def test_a_job_holds_through_rank_0_only(tmp_path):
    from dist_utils import run_ranks

    outcomes = run_ranks(_two_ranks_try, 2, str(tmp_path / "run"))
    assert outcomes == [("held", True), ("held", False)]


def test_a_sweep_on_a_held_root_is_refused(holder, monkeypatch, capsys):
    from optune_nemo.analysis import sweep

    root, proc = holder
    monkeypatch.setattr(sweep, "run_local", lambda *a, **k: pytest.fail("a refused sweep ran something"))
    rc = sweep.main(["--root", str(root), "--rho", "1", "--seeds", "1", "--iterations", "2", "--",
                     "policy.hf_path=null", "eval.num_prompts=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith(f"optune_nemo.analysis.sweep: error: exp_dir {root} is in use by another run")
    assert f"pid {proc.pid}" in err[-1]
