"""slurm/train_rm.sh without a cluster: syntax, directives, exp_dir parsing (the train_rm schema's default),
and the requeue decision with stand-in `srun` / `scontrol` executables that record their calls."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "slurm" / "train_rm.sh"


def _run_script(tmp_path, srun_body, *, signal_after=None, args=None):
    """The script with stand-ins for `srun` (runs `srun_body`) and `scontrol`, both recording their calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/usr/bin/env bash\necho srun \"$@\" >> {tmp_path}/calls\n{srun_body}\n")
    (bin_dir / "scontrol").write_text(f"#!/usr/bin/env bash\necho scontrol \"$@\" >> {tmp_path}/calls\n"
                                      "[ \"$1\" = show ] && echo node1\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_NTASKS": "2",
           "SLURM_JOB_NODELIST": "node1", "OPTUNE_PYTHON": sys.executable, "OPTUNE_REPO": str(ROOT)}
    args = [f"exp_dir={tmp_path}/exp"] if args is None else args
    proc = subprocess.Popen(["bash", str(SCRIPT), *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if signal_after is not None:
        time.sleep(signal_after)
        proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    calls = (tmp_path / "calls").read_text() if (tmp_path / "calls").exists() else ""
    return proc.returncode, out, calls


def test_syntax_and_directives():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    for directive in ("--job-name=", "--cpus-per-task=", "--requeue", "--signal=B:USR1@", "--open-mode=append",
                      "--nodes=", "--ntasks-per-node=8", "--gpus-per-node=8", "--time=", "--output="):
        assert f"#SBATCH {directive}" in text, directive


@pytest.mark.parametrize("args,expected", [
    (["rm.epochs=2", "exp_dir=/a", "seed=3"], "/a"),
    (["exp_dir=/a", "++exp_dir=/b"], "/b"),
    (["rm.epochs=2"], "runs/rm"),        # the train_rm schema's default, asked from Python
])
def test_exp_dir_parsing(args, expected):
    cmd = f'OPTUNE_PYTHON={sys.executable}; PY=$OPTUNE_PYTHON; source {SCRIPT}; exp_dir_of "$@"'
    out = subprocess.run(["bash", "-c", cmd, "x", *args], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == expected


def test_arguments_reach_train_rm_and_completed_runs_are_not_requeued(tmp_path):
    finish = f"mkdir -p {tmp_path}/exp; touch {tmp_path}/exp/COMPLETED; exit 0"
    rc, out, calls = _run_script(tmp_path, finish,
                                 args=["data.path=/d.jsonl", "rm.epochs=2", f"exp_dir={tmp_path}/exp"])
    srun = next(line for line in calls.splitlines() if line.startswith("srun "))
    assert srun.endswith(f"-m optune_nemo.train_rm data.path=/d.jsonl rm.epochs=2 exp_dir={tmp_path}/exp"), srun
    assert rc == 0 and "requeue" not in calls and "run complete" in out


def test_preempted_run_is_requeued_as_the_last_action(tmp_path):
    rc, out, calls = _run_script(tmp_path, "sleep 30 & sp=$!; trap 'kill $sp; exit 0' USR1; wait",
                                 signal_after=1.0)
    assert calls.strip().splitlines()[-1] == "scontrol requeue 42", calls
    assert "forwarding" in out


def test_failure_without_signal_is_not_requeued(tmp_path):
    rc, out, calls = _run_script(tmp_path, "exit 2")
    assert rc == 2 and "requeue" not in calls
