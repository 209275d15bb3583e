"""The sweep runner (optune_nemo/analysis/sweep.py, slurm/sweep.sh, slurm/rho_sweep.sh) without a cluster: the plan
(which runs, their overrides, exp_dir names, init_from paths), resuming (COMPLETED runs skipped, forks of a
failed base not started), the dry-run output, the two job arrays with their dependency through a stand-in
`sbatch`, and an array task of slurm/sweep.sh through stand-in `srun` / `scontrol`. A real tiny sweep runs
locally once `init_from` exists (slow)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from optune_nemo.analysis.sweep import has_init_from, main, plan_sweep, settings
from optune_nemo.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _plan(root, **kw):
    args = dict(rhos=[0.5, 1.0], selections=["lowest_reward", "random"], losses=["wdpo"], seeds=[1, 2],
                iterations=3, control=True, fixed=["policy.hf_path=null", "data.num_prompts=8"])
    return plan_sweep(root, **{**args, **kw})


def test_settings_run_rho1_once_as_all():
    assert settings([0.3, 1.0], ["lowest_reward", "random", "all"], ["wdpo", "dpo"]) == [
        (0.3, "lowest_reward", "wdpo"), (0.3, "random", "wdpo"), (0.3, "lowest_reward", "dpo"),
        (0.3, "random", "dpo"), (1.0, "all", "wdpo"), (1.0, "all", "dpo")]
    with pytest.raises(ConfigError, match="^--rho"):
        settings([0.0], ["random"], ["wdpo"])


def test_plan_runs_names_and_overrides(tmp_path):
    plan = _plan(tmp_path)
    root = tmp_path.resolve()
    assert [r.name for r in plan] == [
        "base/wdpo-seed1", "base/notrain-seed1", "base/wdpo-seed2", "base/notrain-seed2",
        "runs/rho0.5-lowest_reward-wdpo-seed1", "runs/rho0.5-lowest_reward-wdpo-seed2",
        "runs/rho0.5-random-wdpo-seed1", "runs/rho0.5-random-wdpo-seed2",
        "runs/rho1-all-wdpo-seed1", "runs/rho1-all-wdpo-seed2",
        "runs/rho1-all-notrain-seed1", "runs/rho1-all-notrain-seed2"]
    by = {r.name: r for r in plan}
    assert by["base/wdpo-seed2"].overrides == (
        "policy.hf_path=null", "data.num_prompts=8", "seed=2", "optune.rho=1.0", "optune.selection=all",
        "loss.name=wdpo", "optune.iterations=1", "policy.export_hf_final=false", f"exp_dir={root}/base/wdpo-seed2")
    assert by["base/notrain-seed1"].overrides[2] == "train.epochs_per_iteration=0"
    fork = by["runs/rho0.5-random-wdpo-seed2"]
    assert fork.stage == "fork" and fork.base == root / "base" / "wdpo-seed2"
    assert fork.exp_dir == root / "runs" / "rho0.5-random-wdpo-seed2"
    assert fork.overrides == (
        "policy.hf_path=null", "data.num_prompts=8", "seed=2", "optune.rho=0.5", "optune.selection=random",
        "loss.name=wdpo", "optune.iterations=3", f"exp_dir={root}/runs/rho0.5-random-wdpo-seed2",
        f"init_from={root}/base/wdpo-seed2/checkpoints/iter_000000")
    control = by["runs/rho1-all-notrain-seed1"]
    assert "train.epochs_per_iteration=0" in control.overrides
    assert control.overrides[-1] == f"init_from={root}/base/notrain-seed1/checkpoints/iter_000000"
    assert all(r.stage == "base" for r in plan[:4]) and all(r.stage == "fork" for r in plan[4:])


def test_plan_per_loss_bases_and_fixed_epochs(tmp_path):
    plan = _plan(tmp_path, rhos=[0.7], selections=["lowest_reward"], losses=["wdpo", "dpo"], seeds=[3],
                 control=True, fixed=["train.epochs_per_iteration=2"])
    by = {r.name: r for r in plan}
    assert sorted(by) == ["base/dpo-seed3", "base/notrain-seed3", "base/wdpo-seed3",
                          "runs/rho0.7-lowest_reward-dpo-seed3", "runs/rho0.7-lowest_reward-wdpo-seed3",
                          "runs/rho1-all-notrain-seed3"]
    assert by["runs/rho0.7-lowest_reward-dpo-seed3"].base == tmp_path.resolve() / "base" / "dpo-seed3"
    assert "train.epochs_per_iteration=2" in by["base/dpo-seed3"].overrides
    control = by["runs/rho1-all-notrain-seed3"].overrides
    assert "train.epochs_per_iteration=0" in control and "train.epochs_per_iteration=2" not in control


@pytest.mark.parametrize("fixed,match", [(["seed=3"], "^seed: set by the sweep"),
                                         (["++optune.rho=0.2"], "^optune.rho: set by the sweep"),
                                         (["oops"], "key=value"), (["data.path=a\tb"], "tabs")])
def test_plan_rejects_bad_fixed_overrides(tmp_path, fixed, match):
    with pytest.raises(ConfigError, match=match):
        _plan(tmp_path, fixed=fixed)


def test_plan_num_samples_gives_the_forks_n_and_keeps_the_bases(tmp_path):
    """--num-samples: the forks carry generation.num_samples and an -n<N> name, the bases and the control do
    not (they are the same runs as those of a sweep without it on the same root)."""
    plan = _plan(tmp_path, rhos=[0.5, 1.0], selections=["lowest_reward"], seeds=[1], num_samples=3)
    root = tmp_path.resolve()
    by = {r.name: r for r in plan}
    assert sorted(by) == ["base/notrain-seed1", "base/wdpo-seed1", "runs/rho0.5-lowest_reward-wdpo-n3-seed1",
                          "runs/rho1-all-notrain-seed1", "runs/rho1-all-wdpo-n3-seed1"]
    assert by["base/wdpo-seed1"].overrides == _plan(tmp_path, seeds=[1])[0].overrides
    fork = by["runs/rho0.5-lowest_reward-wdpo-n3-seed1"]
    assert "generation.num_samples=3" in fork.overrides
    assert fork.overrides[-1] == f"init_from={root}/base/wdpo-seed1/checkpoints/iter_000000"
    assert not any(o.startswith("generation.num_samples") for o in by["runs/rho1-all-notrain-seed1"].overrides)
    with pytest.raises(ConfigError, match="^--num-samples: must be >= 2"):
        _plan(tmp_path, num_samples=1)
    with pytest.raises(ConfigError, match="^generation.num_samples: set by --num-samples"):
        _plan(tmp_path, num_samples=4, fixed=["generation.num_samples=3"])


def test_plan_needs_two_iterations(tmp_path):
    with pytest.raises(ConfigError, match="^--iterations"):
        _plan(tmp_path, iterations=1)


ARGS = ["--rho", "0.5", "1", "--selection", "lowest_reward", "--seeds", "1", "2", "--iterations", "3"]


def test_dry_run_prints_the_commands_and_skips_completed(tmp_path, capsys):
    root = tmp_path / "sweep"
    (root / "base" / "wdpo-seed1").mkdir(parents=True)
    (root / "base" / "wdpo-seed1" / "COMPLETED").write_text("ok\n")
    assert main(["--root", str(root), *ARGS, "--dry-run", "--", "policy.hf_path=null"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "# done: base/wdpo-seed1"
    commands = [shlex.split(line) for line in lines[1:]]
    assert len(commands) == 1 + 4
    for cmd in commands:
        assert cmd[:3] == [sys.executable, "-m", "optune_nemo.train"] and cmd[3] == "policy.hf_path=null"
    r = root.resolve()
    assert commands[0][-1] == f"exp_dir={r}/base/wdpo-seed2"
    assert commands[1][-2:] == [f"exp_dir={r}/runs/rho0.5-lowest_reward-wdpo-seed1",
                                f"init_from={r}/base/wdpo-seed1/checkpoints/iter_000000"]
    assert not (root / "runs").exists()          # a dry run writes nothing


STUB_TRAIN = """\
import json, os, sys, time
from pathlib import Path
args = sys.argv[sys.argv.index("-m") + 2:]
exp = Path(next(a for a in args if a.startswith("exp_dir=")).split("=", 1)[1])
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
if exp.name in os.environ.get("STUB_FAIL", "").split(","):
    sys.exit(3)
ckpt = exp / "checkpoints" / "iter_000000"
(ckpt / "model").mkdir(parents=True, exist_ok=True)
(ckpt / "model" / "__0_0.distcp").write_bytes(b"w")
for name in ("rng_states.pt", "rollouts.parquet", "metrics.jsonl"):
    (ckpt / name).write_bytes(b"x")
(exp / "COMPLETED").write_text("ok\\n")
"""


def _local(tmp_path, monkeypatch, fail="", extra=()):
    stub = tmp_path / "stub_train.py"
    stub.write_text(STUB_TRAIN)
    monkeypatch.setenv("STUB_LOG", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("STUB_FAIL", fail)
    monkeypatch.setattr("optune_nemo.analysis.sweep.has_init_from", lambda: True)
    monkeypatch.setattr("optune_nemo.analysis.sweep.check_overrides", lambda plan: None)
    rc = main(["--root", str(tmp_path / "sweep"), *ARGS, *extra, "--launcher", f"{sys.executable} {stub}"])
    log = tmp_path / "calls.jsonl"
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    log.unlink(missing_ok=True)
    return rc, [next(a.split("/")[-1] for a in c if a.startswith("exp_dir=")) for c in calls]


def test_local_runs_bases_first_and_resumes(tmp_path, monkeypatch):
    rc, ran = _local(tmp_path, monkeypatch, fail="rho1-all-wdpo-seed2")
    assert rc == 1
    assert ran == ["wdpo-seed1", "wdpo-seed2", "rho0.5-lowest_reward-wdpo-seed1", "rho0.5-lowest_reward-wdpo-seed2",
                   "rho1-all-wdpo-seed1", "rho1-all-wdpo-seed2"]
    rc, ran = _local(tmp_path, monkeypatch)            # the same command again: only the failed run
    assert rc == 0 and ran == ["rho1-all-wdpo-seed2"]
    rc, ran = _local(tmp_path, monkeypatch)
    assert rc == 0 and ran == []


def test_local_skips_forks_of_a_failed_base(tmp_path, monkeypatch):
    rc, ran = _local(tmp_path, monkeypatch, fail="wdpo-seed2")
    assert rc == 1
    assert ran == ["wdpo-seed1", "wdpo-seed2", "rho0.5-lowest_reward-wdpo-seed1", "rho1-all-wdpo-seed1"]


def test_prune_removes_fork_shards_and_keeps_what_the_report_reads(tmp_path, monkeypatch):
    rc, ran = _local(tmp_path, monkeypatch, extra=["--prune"])
    assert rc == 0 and len(ran) == 6
    root = tmp_path / "sweep"
    for ckpt in (root / "runs").glob("*/checkpoints/iter_000000"):
        assert sorted(p.name for p in ckpt.iterdir()) == ["metrics.jsonl", "rollouts.parquet"]
    for ckpt in (root / "base").glob("*/checkpoints/iter_000000"):    # forks start from the bases: kept
        assert (ckpt / "model" / "__0_0.distcp").is_file() and (ckpt / "rng_states.pt").is_file()
    assert len(list((root / "runs").glob("*/checkpoints/iter_000000"))) == 4


def test_running_needs_init_from(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("optune_nemo.analysis.sweep.has_init_from", lambda: False)
    assert main(["--root", str(tmp_path), *ARGS]) == 2
    assert "init_from" in capsys.readouterr().err


def test_wrong_override_stops_before_any_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("optune_nemo.analysis.sweep.has_init_from", lambda: True)
    assert main(["--root", str(tmp_path / "s"), *ARGS, "--", "optune.no_such_key=1"]) == 2
    err = capsys.readouterr().err
    assert "optune.no_such_key" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------- Slurm without a cluster


def _stub_bin(tmp_path, name, body):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
    (bin_dir / name).chmod(0o755)
    return bin_dir


def test_slurm_submits_two_arrays_with_dependency(tmp_path, monkeypatch, capsys):
    bin_dir = _stub_bin(tmp_path, "sbatch", f'echo "$@" >> {tmp_path}/sbatch_calls; '
                                            f'echo $(( 100 + $(wc -l < {tmp_path}/sbatch_calls) ))";cluster"')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr("optune_nemo.analysis.sweep.has_init_from", lambda: True)
    monkeypatch.setattr("optune_nemo.analysis.sweep.check_overrides", lambda plan: None)
    root = tmp_path / "sweep"
    (root / "runs" / "rho1-all-wdpo-seed1").mkdir(parents=True)
    (root / "runs" / "rho1-all-wdpo-seed1" / "COMPLETED").write_text("ok\n")
    assert main(["--root", str(root), *ARGS, "--slurm", "--max-running", "2",
                 "--sbatch-args", "--partition=ci --ntasks-per-node=1", "--", "policy.hf_path=null"]) == 0
    base_call, fork_call = (shlex.split(c) for c in (tmp_path / "sbatch_calls").read_text().splitlines())
    r = root.resolve()
    assert base_call == ["--parsable", "--array=0-1%2", "--job-name=optune-sweep-base",
                         f"--output={r}/slurm/%x-%A_%a.out", "--partition=ci", "--ntasks-per-node=1",
                         str(ROOT / "slurm" / "sweep.sh"), f"{r}/slurm/base.plan"]
    assert fork_call[1:3] == ["--array=0-2%2", "--job-name=optune-sweep-fork"]
    assert "--dependency=afterok:101" in fork_call and "--kill-on-invalid-dep=yes" in fork_call
    assert fork_call[-1] == f"{r}/slurm/fork.plan"
    base_plan = [line.split("\t") for line in (r / "slurm" / "base.plan").read_text().splitlines()]
    fork_plan = [line.split("\t") for line in (r / "slurm" / "fork.plan").read_text().splitlines()]
    assert [p[-1] for p in base_plan] == [f"exp_dir={r}/base/wdpo-seed1", f"exp_dir={r}/base/wdpo-seed2"]
    assert [p[-2] for p in fork_plan] == [f"exp_dir={r}/runs/rho0.5-lowest_reward-wdpo-seed1",
                                          f"exp_dir={r}/runs/rho0.5-lowest_reward-wdpo-seed2",
                                          f"exp_dir={r}/runs/rho1-all-wdpo-seed2"]   # seed 1 is COMPLETED
    out = capsys.readouterr().out
    assert "submitted base array 101" in out and "submitted fork array 102" in out


def test_slurm_without_pending_bases_submits_forks_without_dependency(tmp_path, monkeypatch):
    bin_dir = _stub_bin(tmp_path, "sbatch", f'echo "$@" >> {tmp_path}/sbatch_calls; echo 7')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr("optune_nemo.analysis.sweep.has_init_from", lambda: True)
    monkeypatch.setattr("optune_nemo.analysis.sweep.check_overrides", lambda plan: None)
    root = tmp_path / "sweep"
    for seed in (1, 2):
        (root / "base" / f"wdpo-seed{seed}").mkdir(parents=True)
        (root / "base" / f"wdpo-seed{seed}" / "COMPLETED").write_text("ok\n")
    assert main(["--root", str(root), *ARGS, "--slurm"]) == 0
    calls = (tmp_path / "sbatch_calls").read_text().splitlines()
    assert len(calls) == 1 and "optune-sweep-fork" in calls[0] and "dependency" not in calls[0]


def test_sweep_sh_runs_its_plan_line_through_optune_sh(tmp_path):
    bin_dir = _stub_bin(tmp_path, "srun", f'echo srun "$@" >> {tmp_path}/calls; exit 0')
    _stub_bin(tmp_path, "scontrol", f'echo scontrol "$@" >> {tmp_path}/calls; [ "$1" = show ] && echo node1; exit 0')
    plan = tmp_path / "fork.plan"
    plan.write_text("seed=1\texp_dir=/x/a\n" "data.path=/p q/r.jsonl\tseed=2\texp_dir=/x/b\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_NTASKS": "1",
           "SLURM_JOB_NODELIST": "node1", "SLURM_ARRAY_TASK_ID": "1", "OPTUNE_PYTHON": sys.executable,
           "OPTUNE_REPO": str(ROOT)}
    proc = subprocess.run(["bash", str(ROOT / "slurm" / "sweep.sh"), str(plan)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    srun = next(line for line in (tmp_path / "calls").read_text().splitlines() if line.startswith("srun "))
    assert srun.endswith("-m optune_nemo.train data.path=/p q/r.jsonl seed=2 exp_dir=/x/b"), srun
    env["SLURM_ARRAY_TASK_ID"] = "5"
    proc = subprocess.run(["bash", str(ROOT / "slurm" / "sweep.sh"), str(plan)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "has no line 6" in proc.stderr


@pytest.mark.parametrize("script", ["sweep.sh", "rho_sweep.sh"])
def test_scripts_syntax(script):
    subprocess.run(["bash", "-n", str(ROOT / "slurm" / script)], check=True)


def test_sweep_sh_directives():
    text = (ROOT / "slurm" / "sweep.sh").read_text()
    for directive in ("--requeue", "--signal=B:USR1@", "--open-mode=append", "--output="):
        assert f"#SBATCH {directive}" in text, directive


def test_rho_sweep_sh_submits_the_paper_sweep(tmp_path):
    """slurm/rho_sweep.sh: the two-stage sweep over rho 0.3, 0.5, 0.7 (lowest_reward) and 1 (all)."""
    env = {**os.environ, "OPTUNE_PYTHON": sys.executable, "OPTUNE_SWEEP_DIR": str(tmp_path / "sweep")}
    proc = subprocess.run(["bash", str(ROOT / "slurm" / "rho_sweep.sh"), "--seeds", "1", "--iterations", "4",
                           "--dry-run", "--", "data.num_prompts=8"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out, r = proc.stdout, (tmp_path / "sweep").resolve()
    for name in ("rho0.3-lowest_reward-wdpo-seed1", "rho0.5-lowest_reward-wdpo-seed1",
                 "rho0.7-lowest_reward-wdpo-seed1", "rho1-all-wdpo-seed1"):
        assert f"exp_dir={r}/runs/{name} init_from={r}/base/wdpo-seed1/checkpoints/iter_000000" in out, out
    assert "--dependency=afterok:<base-job-id>" in out and "data.num_prompts=8" in out


# --------------------------------------------------------------------------- a real tiny sweep


TINY = ["policy.hf_path=null", "eval.num_prompts=0", "optim.lr=5e-4", "data.num_prompts=8",
        "generation.max_new_tokens=16", "generation.chunk_size=4", "generation.batch_size=4",
        "train.global_batch_size=4", "train.micro_batch_size=2", "logging.progress=false",
        "logging.tensorboard=false", "model.init_method_std=0.1",
        "reward.function._target_=optune_nemo.reward.rules.length_reward", "++reward.function.target_chars=6"]


@pytest.mark.slow
@pytest.mark.skipif(not has_init_from(), reason="needs the init_from option in optune_nemo/config.py "
                                                "(forks start from the base run's checkpoint)")
def test_tiny_sweep_runs_locally_and_forks_inherit_iteration0(tmp_path):
    root = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "optune_nemo.sweep", "--root", str(root), "--rho", "0.5", "1",
           "--seeds", "1", "--iterations", "2", "--", *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    base = root / "base" / "wdpo-seed1"
    base0 = json.loads((base / "metrics.jsonl").read_text().splitlines()[0])
    for name in ("rho0.5-lowest_reward-wdpo-seed1", "rho1-all-wdpo-seed1"):
        run = root / "runs" / name
        assert (run / "COMPLETED").is_file()
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in records] == [0, 1]
        assert records[0] == base0
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.count("# done:") == 3     # resumed: nothing left to run
