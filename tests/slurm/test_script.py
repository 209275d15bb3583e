"""slurm/optune.sh without a cluster: syntax, directives, exp_dir parsing, and the requeue decision
with stand-in `srun` / `scontrol` executables that record their calls."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "slurm" / "optune.sh"


@pytest.mark.parametrize("script", ["optune.sh", "rho_sweep.sh"])
def test_syntax(script):
    subprocess.run(["bash", "-n", str(ROOT / "slurm" / script)], check=True)


def test_directives():
    text = SCRIPT.read_text()
    for directive in ("--job-name=", "--cpus-per-task=", "--requeue", "--signal=B:USR1@", "--open-mode=append",
                      "--nodes=", "--ntasks-per-node=8", "--gpus-per-node=8", "--time=", "--output="):
        assert f"#SBATCH {directive}" in text, directive


@pytest.mark.parametrize("args,expected", [
    (["optune.rho=0.5", "exp_dir=/a", "seed=3"], "/a"),
    (["exp_dir=/a", "++exp_dir=/b"], "/b"),
    (["+exp_dir=/c"], "/c"),
    (["optune.rho=0.5"], "runs/default"),        # the schema's default, asked from Python
])
def test_exp_dir_parsing(args, expected):
    cmd = f'OPTUNE_PYTHON={sys.executable}; PY=$OPTUNE_PYTHON; source {SCRIPT}; exp_dir_of "$@"'
    out = subprocess.run(["bash", "-c", cmd, "x", *args], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == expected


def _stubs(tmp_path: Path, srun_body: str) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/usr/bin/env bash\necho srun \"$@\" >> {tmp_path}/calls\n{srun_body}\n")
    (bin_dir / "scontrol").write_text(
        f"#!/usr/bin/env bash\necho scontrol \"$@\" >> {tmp_path}/calls\n"
        "[ \"$1\" = show ] && echo node1\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_NTASKS": "2",
            "SLURM_JOB_NODELIST": "node1", "OPTUNE_PYTHON": sys.executable, "OPTUNE_REPO": str(ROOT)}


def _run_script(tmp_path, srun_body, *, signal_after=None, script=SCRIPT, args=None, extra_env=None):
    env = {**_stubs(tmp_path, srun_body), **(extra_env or {})}
    args = [f"exp_dir={tmp_path}/exp"] if args is None else args
    proc = subprocess.Popen(["bash", str(script), *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if signal_after is not None:
        time.sleep(signal_after)
        proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    calls = (tmp_path / "calls").read_text() if (tmp_path / "calls").exists() else ""
    return proc.returncode, out, calls


def test_completed_run_is_not_requeued_even_when_signalled(tmp_path):
    # the tasks finish the run (COMPLETED) right as the pre-emption signal arrives
    finish = f"mkdir -p {tmp_path}/exp; touch {tmp_path}/exp/COMPLETED; exit 0"
    rc, out, calls = _run_script(tmp_path, f"sleep 30 & sp=$!; trap 'kill $sp; {finish}' USR1; wait",
                                 signal_after=1.0)
    assert rc == 0 and "requeue" not in calls and "run complete" in out


def test_preempted_run_is_requeued_as_the_last_action(tmp_path):
    rc, out, calls = _run_script(tmp_path, "sleep 30 & sp=$!; trap 'kill $sp; exit 0' USR1; wait", signal_after=1.0)
    assert calls.strip().splitlines()[-1] == "scontrol requeue 42", calls
    assert "MASTER_ADDR" not in out and "forwarding" in out


def test_failure_without_signal_is_not_requeued(tmp_path):
    rc, out, calls = _run_script(tmp_path, "exit 3")
    assert rc == 3 and "requeue" not in calls


def test_arguments_and_container_reach_srun(tmp_path):
    rc, out, calls = _run_script(tmp_path, "exit 0", args=["optune.rho=0.3", "seed=7", f"exp_dir={tmp_path}/exp"],
                                 extra_env={"OPTUNE_CONTAINER_IMAGE": "/img.sqsh", "OPTUNE_CONTAINER_MOUNTS": "/a:/a"})
    srun = next(line for line in calls.splitlines() if line.startswith("srun "))
    assert "--container-image=/img.sqsh" in srun and "--container-mounts=/a:/a" in srun
    assert srun.endswith(f"-m optune_nemo.train optune.rho=0.3 seed=7 exp_dir={tmp_path}/exp"), srun
    assert rc == 0 and "requeue" not in calls
