"""The sweep as Slurm job arrays on the single-node cluster (.ci/slurm/up.sh): the bases' array, then the
forks' array that waits for it (afterok). First with a stand-in trainer (the Slurm plumbing: both arrays
run every task of their plan, forks only after every base ended); then a real tiny 2-seed x 2-setting
sweep, which needs `init_from` (skipped until optune_nemo/config.py has it): every run COMPLETED and each
fork's first metrics record is its base's iteration 0. Skipped without a cluster, unless
OPTUNE_REQUIRE_SLURM=1 (CI), where a missing cluster fails."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_slurm import cluster  # noqa: F401  (the autouse skip/fail without a cluster)

from optune_nemo.analysis.sweep import has_init_from, plan_sweep, submit_slurm

pytestmark = pytest.mark.slurm
ROOT = Path(__file__).resolve().parents[2]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}
SBATCH_ARGS = ["--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=1"]  # the CI cluster has no GPU
TINY = ["policy.hf_path=null", "eval.num_prompts=0", "optim.lr=5e-4", "data.num_prompts=8",
        "generation.max_new_tokens=16", "generation.chunk_size=4", "generation.batch_size=4",
        "train.global_batch_size=4", "train.micro_batch_size=2", "logging.progress=false",
        "logging.tensorboard=false", "model.init_method_std=0.1",
        "reward.function._target_=optune_nemo.reward.rules.length_reward", "++reward.function.target_chars=6"]


def _states(job_id: str) -> list[str] | None:
    """JobState of every task of an array (one line for a still pending array); None once purged."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    if out.returncode != 0:
        return None
    return re.findall(r"JobState=(\S+)", out.stdout)


def _wait(job_ids: list[str], timeout: float) -> dict[str, list[str] | None]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = {j: _states(j) for j in job_ids}
        if all(s is None or (s and set(s) <= TERMINAL) for s in states.values()):
            return states
        time.sleep(1)
    raise AssertionError(f"arrays {job_ids} not finished after {timeout} s: {states}")


def _logs(root: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted(root.glob("slurm/*.out")))


STUB_PYTHON = """\
#!/usr/bin/env bash
# stands in for `python -m optune_nemo.train overrides...`: records when it ran, writes COMPLETED
shift 2
for a in "$@"; do case "$a" in exp_dir=*) exp=${a#exp_dir=} ;; esac; done
echo "start $(date +%s.%N) $exp" >> "$STUB_LOG"
sleep 1
mkdir -p "$exp" && echo ok > "$exp/COMPLETED"
echo "end $(date +%s.%N) $exp" >> "$STUB_LOG"
"""


def test_arrays_run_every_plan_line_and_forks_wait_for_bases(tmp_path, monkeypatch):
    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    monkeypatch.setenv("OPTUNE_PYTHON", str(stub))
    monkeypatch.setenv("OPTUNE_REPO", str(ROOT))
    monkeypatch.setenv("STUB_LOG", str(tmp_path / "stub.log"))
    root = tmp_path / "sweep"
    plan = plan_sweep(root, rhos=[0.5, 1.0], selections=["lowest_reward"], losses=["wdpo"], seeds=[1, 2],
                      iterations=2, control=False, fixed=["policy.hf_path=null"])
    base_id, fork_id = submit_slurm(plan, root, sbatch_args=SBATCH_ARGS, max_running=None, dry_run=False)
    states = _wait([base_id, fork_id], timeout=300)
    assert all(s is None or set(s) == {"COMPLETED"} for s in states.values()), (states, _logs(root))
    assert all(r.completed for r in plan), _logs(root)
    events = [line.split() for line in (tmp_path / "stub.log").read_text().splitlines()]
    starts = {Path(e[2]).name: float(e[1]) for e in events if e[0] == "start"}
    ends = {Path(e[2]).name: float(e[1]) for e in events if e[0] == "end"}
    assert sorted(starts) == sorted(r.exp_dir.name for r in plan) and len(events) == 2 * len(plan)
    last_base_end = max(ends[r.exp_dir.name] for r in plan if r.stage == "base")
    assert all(starts[r.exp_dir.name] >= last_base_end for r in plan if r.stage == "fork"), events


def test_a_failed_base_cancels_the_fork_array(tmp_path, monkeypatch):
    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON.replace("shift 2\n", "shift 2\ncase \"$*\" in *wdpo-seed2*) exit 3 ;; esac\n"))
    stub.chmod(0o755)
    monkeypatch.setenv("OPTUNE_PYTHON", str(stub))
    monkeypatch.setenv("OPTUNE_REPO", str(ROOT))
    monkeypatch.setenv("STUB_LOG", str(tmp_path / "stub.log"))
    root = tmp_path / "sweep"
    plan = plan_sweep(root, rhos=[0.5], selections=["lowest_reward"], losses=["wdpo"], seeds=[1, 2], iterations=2,
                      control=False, fixed=[])
    base_id, fork_id = submit_slurm(plan, root, sbatch_args=SBATCH_ARGS, max_running=None, dry_run=False)
    states = _wait([base_id, fork_id], timeout=300)
    assert sorted(states[base_id]) == ["COMPLETED", "FAILED"], states
    assert states[fork_id] == ["CANCELLED"], states                 # never started: no fork ran
    assert not (root / "runs").exists()


@pytest.mark.skipif(not has_init_from(), reason="needs the init_from option in optune_nemo/config.py "
                                                "(forks start from the base run's checkpoint)")
def test_tiny_sweep_as_job_arrays(tmp_path):
    root = tmp_path / "sweep"
    env = {**os.environ, "OPTUNE_PYTHON": sys.executable, "OPTUNE_REPO": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "optune_nemo.sweep", "--slurm", "--root", str(root),
                           "--rho", "0.5", "1", "--seeds", "1", "2", "--iterations", "2",
                           "--sbatch-args", " ".join(SBATCH_ARGS), "--", *TINY],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ids = re.findall(r"submitted (?:base|fork) array (\d+)", proc.stdout)
    assert len(ids) == 2, proc.stdout
    states = _wait(ids, timeout=1500)
    assert all(s is None or set(s) == {"COMPLETED"} for s in states.values()), (states, _logs(root))
    for seed in (1, 2):
        base = root / "base" / f"wdpo-seed{seed}"
        assert (base / "COMPLETED").is_file(), _logs(root)
        base0 = json.loads((base / "metrics.jsonl").read_text().splitlines()[0])
        assert base0["iteration"] == 0
        for name in (f"rho0.5-lowest_reward-wdpo-seed{seed}", f"rho1-all-wdpo-seed{seed}"):
            run = root / "runs" / name
            assert (run / "COMPLETED").is_file(), _logs(root)
            records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            assert [r["iteration"] for r in records] == [0, 1]
            assert records[0] == base0
    report = subprocess.run([sys.executable, "-m", "optune_nemo.report", str(root), "--out", str(tmp_path / "report")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| rho=0.5 lowest_reward wdpo | 1, 2 | 2 |" in md and "| rho=1 all wdpo | 1, 2 | 2 |" in md
