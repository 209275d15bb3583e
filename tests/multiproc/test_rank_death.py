"""One rank of a data-parallel torchrun job dies or hangs: the whole job ends, within a bound, with a
non-zero exit and no process of it left; after a death, the rerun (resume=auto) ends identical to an
uninterrupted run. The rank is SIGKILLed from outside (the OOM killer, a node fault) at a moment read
from what the run writes anyway: a generation chunk of iteration 1 under exp_dir/partial/, or the
"iteration 1: phase=train" log line. The hang: one rank stuck in the reward function (outside any
collective) is ended by parallel.distributed_timeout_minutes. docs/slurm.md, "When a rank dies or
hangs", states the bounds asserted here. The same under srun: tests/slurm/test_rank_death_slurm.py."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
from test_optune_loop import _metrics, _store  # noqa: E402  (the e2e tests' readers of a run)

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

# DP=2 on gloo, iteration 0 + 1. Six generation chunks in iteration 1 and six training epochs keep each
# phase a few seconds long on a 2-core CPU, so a kill placed on its first sign lands inside it.
RUN = ["policy.hf_path=null", "eval.num_prompts=0", "precision=fp32", "optim.lr=5e-4", "data.num_prompts=16",
       "optune.rho=0.75", "optune.iterations=2", "generation.max_new_tokens=48", "generation.chunk_size=2",
       "generation.batch_size=2", "train.global_batch_size=8", "train.micro_batch_size=1",
       "train.epochs_per_iteration=6", "logging.progress=false", "model.init_method_std=0.1",
       "reward.function._target_=optune_nemo.reward.rules.length_reward", "++reward.function.target_chars=6"]
CHUNKS_ITER1 = 6            # ceil(0.75 * 16) = 12 prompts in chunks of 2
DEATH_BOUND_S = 60          # kill of one rank -> the job has ended (measured: 1-3 s)
HANG_TIMEOUT_MIN = 0.1      # 6 s
HANG_GRACE_S = 30           # torchrun's SIGTERM -> SIGKILL wait for the hung rank (the guard catches SIGTERM)


def _torchrun(exp: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            "-m", "optune_nemo.train", *RUN, f"exp_dir={exp}", *overrides]


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests" / "fixtures"), **extra}


def _run(exp: Path, log: Path, *overrides: str) -> None:
    with open(log, "ab") as out:
        rc = subprocess.run(_torchrun(exp, *overrides), cwd=ROOT, env=_env(), stdout=out, stderr=out,
                            timeout=600).returncode
    assert rc == 0, log.read_text(errors="replace")[-4000:]


def _rank_pid(launcher: psutil.Process, rank: int) -> int:
    for child in launcher.children():
        try:
            if child.environ().get("RANK") == str(rank):
                return child.pid
        except psutil.NoSuchProcess:
            pass
    raise AssertionError(f"no rank {rank} under the launcher {launcher.pid}")


def _left_running(exp: Path, seen: list[psutil.Process]) -> list:
    """Every process of the job still alive: the launcher's descendants seen during the run, and anything
    whose command line names the run's (unique) exp_dir."""
    _, alive = psutil.wait_procs(seen, timeout=5)
    named = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.pid != os.getpid() and any(str(exp) in arg for arg in (p.info["cmdline"] or [])):
            named.append(p)
    return [(p.pid, p.cmdline()) for p in {*alive, *named} if p.is_running()]


def _watch(exp: Path, log: Path, ready, *, env=None, overrides=(), timeout=300):
    """Start the job in its own session and return, once `ready()` is true, (the launcher's Popen, its
    psutil view, every descendant seen so far); the caller acts, then waits with `_ended`."""
    out = open(log, "ab")
    proc = subprocess.Popen(_torchrun(exp, *overrides), cwd=ROOT, env=env or _env(), stdout=out, stderr=out,
                            start_new_session=True)
    out.close()
    launcher, seen = psutil.Process(proc.pid), {}
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"the job ended before the moment:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the moment did not come in {timeout} s"
            seen.update({c.pid: c for c in launcher.children(recursive=True)})
            time.sleep(0.01)
        seen.update({c.pid: c for c in launcher.children(recursive=True)})
    except BaseException:
        _kill_all(proc, list(seen.values()))
        raise
    return proc, launcher, list(seen.values())


def _kill_all(proc, seen: list[psutil.Process]) -> None:
    """SIGKILL the launcher and every process of the job: torchrun starts each worker in a session of
    its own, so the launcher's process group alone is not enough."""
    try:
        seen = [*seen, *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        pass
    for p in [psutil.Process(proc.pid) if proc.poll() is None else None, *seen]:
        try:
            if p is not None:
                p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def _ended(proc, exp: Path, seen, since: float, bound: float) -> tuple[int, float, list]:
    """(exit code, seconds since `since`, processes of the job left running) once the launcher has ended;
    then (and if it does not end within `bound` + 60 s) kills what is left, so no test leaves anything."""
    try:
        rc = proc.wait(timeout=bound + 60)
        return rc, time.monotonic() - since, _left_running(exp, seen)
    finally:
        _kill_all(proc, seen)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    exp = tmp_path_factory.mktemp("ref") / "run"
    _run(exp, exp.parent / "run.log")
    return exp


def _generation_started(exp: Path):
    return lambda: (exp / "partial" / "iter_000001" / "chunk_00000.json").is_file()


def _training_started(log: Path):
    return lambda: "iteration 1: phase=train" in log.read_text(errors="replace")


@pytest.mark.parametrize("phase", ["generation", "training"])
def test_killed_rank_ends_the_job_and_the_rerun_is_identical(uninterrupted, tmp_path, phase):
    exp, log = tmp_path / "run", tmp_path / "run.log"
    ready = _generation_started(exp) if phase == "generation" else _training_started(log)
    proc, launcher, seen = _watch(exp, log, ready)
    killed = time.monotonic()
    os.kill(_rank_pid(launcher, 1), signal.SIGKILL)
    rc, took, left = _ended(proc, exp, seen, killed, DEATH_BOUND_S)
    text = log.read_text(errors="replace")
    assert rc != 0, text[-3000:]
    assert took < DEATH_BOUND_S, f"the job ended {took:.1f} s after the kill"
    assert not left, left
    # the surviving rank says so in one line (optune_nemo.runner.peer_failure), not with a traceback
    assert "optune_nemo: error on rank 0: another rank of the job died or did not answer" in text, text[-3000:]
    # the kill landed in the phase it was meant for
    assert not (exp / "checkpoints" / "iter_000001").exists()
    assert not (exp / "checkpoints" / "iter_000001.tmp").exists()
    assert [r["iteration"] for r in _metrics(exp)] == [0]
    if phase == "generation":
        done = list((exp / "partial" / "iter_000001").glob("chunk_*.json"))
        assert 1 <= len(done) < CHUNKS_ITER1, done
        assert "iteration 1: phase=reference" not in text
    assert not (exp / "COMPLETED").exists()
    _run(exp, tmp_path / "rerun.log")
    assert re.search(r"resuming from \S+/iter_000000", (tmp_path / "rerun.log").read_text(errors="replace"))
    assert (exp / "COMPLETED").exists()
    assert _store(exp, 1) == _store(uninterrupted, 1)
    assert _metrics(exp) == _metrics(uninterrupted)


def test_hung_rank_ends_the_job_after_the_process_group_timeout(tmp_path):
    """Rank 1 hangs in the reward function (alive, outside any collective); rank 0 waits for it in the
    reward's all-gather, times out after parallel.distributed_timeout_minutes and exits 1; torchrun then
    ends rank 1 (SIGTERM, which the pre-emption guard catches, then SIGKILL after its 30 s)."""
    exp, log, marker = tmp_path / "run", tmp_path / "run.log", tmp_path / "hung"
    env = _env(OPTUNE_TEST_HANG_RANK="1", OPTUNE_TEST_HANG_MARKER=str(marker))
    proc, _, seen = _watch(exp, log, marker.is_file, env=env,
                           overrides=("reward.function._target_=hang_rewards.hang_on_one_rank",
                                      f"parallel.distributed_timeout_minutes={HANG_TIMEOUT_MIN}"))
    hung = time.monotonic()
    timeout_s = 60 * HANG_TIMEOUT_MIN
    rc, took, left = _ended(proc, exp, seen, hung, timeout_s + HANG_GRACE_S + 30)
    text = log.read_text(errors="replace")
    assert rc != 0, text[-3000:]
    assert f"Timed out waiting {int(timeout_s * 1000)}ms" in text, text[-3000:]   # gloo's own message
    assert timeout_s <= took < timeout_s + HANG_GRACE_S + 30, f"the job ended {took:.1f} s after the hang"
    assert not left, left


@pytest.mark.parametrize("value", ["0", "-1"])
def test_timeout_must_be_positive(value):
    """Validated before anything starts, by every entry point that opens a process group: one line naming
    the key (the CLI turns it into exit 2)."""
    from optune_nemo import config
    from optune_nemo.rm import config as config_rm
    from optune_nemo.rm import serve_config as config_serve

    bad = f"parallel.distributed_timeout_minutes={value}"
    checks = [lambda: config.validate(config.load_config([bad])),
              lambda: config_rm.validate(config_rm.load_config([bad])),
              lambda: config_serve.validate_serve(config_serve.ServeRMConfig(
                  parallel=config_serve.ServeParallelConfig(distributed_timeout_minutes=float(value))), world_size=2)]
    for check in checks:
        with pytest.raises(config.ConfigError) as err:
            check()
        assert str(err.value).startswith("parallel.distributed_timeout_minutes: must be > 0"), str(err.value)
        assert "\n" not in str(err.value)
