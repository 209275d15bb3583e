"""A sweep over optune.rho x optune.selection x loss.name x seed that shares iteration 0:
`python -m optune_nemo.sweep --root DIR --rho ... --seeds ... --iterations T [--slurm] [--dry-run] -- key=value ...`

Iteration 0 regenerates every prompt whatever rho and the selection strategy are, so every setting of one
seed (and loss, and training on/off) would repeat the same iteration 0. The sweep runs it once, per seed,
in a base run (optune.iterations=1), and every setting forks from it: `init_from=<base>/checkpoints/
iter_000000` with optune.iterations=T. A fork starts from the base's checkpoint (model, optimizer, rollout
store, RNG, metrics records) in its own exp_dir, so its metrics.jsonl begins with the base's iteration 0.

Layout under --root (absolute paths in every override, so Slurm tasks and forks find them):
  base/<loss>-seed<S>/                 a trained base per loss and seed
  base/notrain-seed<S>/                the no-training base of the controls (--control)
  runs/rho<R>-<selection>-<loss>-seed<S>/
  runs/rho1-all-notrain-seed<S>/       --control: rho = 1, train.epochs_per_iteration=0 (the Fig. 2 control)
  runs/rho<R>-<selection>-<loss>-n<N>-seed<S>/   --num-samples N: forks with generation.num_samples=N
  slurm/                               --slurm: plan files and the array tasks' logs

rho = 1 regenerates every prompt whatever the strategy, so it is run once, as selection=all; selection=all
is only run at rho = 1. The loss is part of the base because iteration 0 trains with it.

--num-samples N gives the forks (not the bases, not the controls) generation.num_samples=N and the name suffix
-n<N>: they start from the same iteration 0 as the sweep's n = 2 forks of the same root (the default n), so
a sweep without --num-samples and one with it, on one root, compare n prompt by prompt and seed by seed,
differing only in the samples drawn per regenerated prompt from iteration 1 on.

Each run is a separate `python -m optune_nemo.train` process (megatron-core keeps global state per
process). A run whose exp_dir/COMPLETED exists is skipped, so rerunning the same command resumes the
sweep; an interrupted run resumes from its own checkpoints (resume=auto). Locally the runs go one after
another (bases first); a fork whose base did not complete is skipped. With --slurm, the bases become one
job array and the forks a second array with --dependency=afterok on the first; each array task runs line
SLURM_ARRAY_TASK_ID of a plan file through slurm/sweep.sh, with the pre-emption handling of
slurm/optune.sh. Why not Hydra's multirun with the submitit launcher: docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from optune_nemo.config import ConfigError, OptuneNemoConfig
from optune_nemo.errors import RunDirBusy
from optune_nemo.runtime.rundir import hold_run_dir

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
COMPLETED = "COMPLETED"      # written by optune_nemo.train when a run finished (runner.COMPLETED)
SWEEP_KEYS = ("seed", "exp_dir", "optune.rho", "optune.selection", "loss.name", "optune.iterations", "init_from")
"""Keys the sweep sets on every run; a fixed override may not set them too."""


@dataclass(frozen=True)
class PlannedRun:
    """One `python -m optune_nemo.train` invocation of the sweep."""

    name: str
    """Path of exp_dir relative to the sweep's root, e.g. runs/rho0.5-lowest_reward-wdpo-seed1."""
    exp_dir: Path
    overrides: tuple[str, ...]
    """Every command-line override of the run, exp_dir and init_from included."""
    stage: str
    """`base` (iteration 0 only) or `fork` (starts from its base's iteration-0 checkpoint)."""
    base: Path | None = None
    """fork: the base run's exp_dir."""

    @property
    def completed(self) -> bool:
        return (self.exp_dir / COMPLETED).is_file()


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _rho_name(rho: float) -> str:
    return f"{rho:g}"


def settings(rhos, selections, losses) -> list[tuple[float, str, str]]:
    """(rho, selection, loss) of the sweep: rho = 1 once as `all`, `all` only at rho = 1."""
    out = []
    for rho in rhos:
        if not 0 < rho <= 1:
            raise ConfigError(f"--rho: every value must be in (0, 1] (got {rho})")
        for loss in losses:
            sels = ["all"] if rho == 1 else [s for s in selections if s != "all"]
            out += [(float(rho), s, loss) for s in sels]
    return sorted(set(out), key=out.index)


def plan_sweep(root: str | Path, *, rhos: list[float], selections: list[str], losses: list[str], seeds: list[int],
               iterations: int, control: bool, fixed: list[str], num_samples: int | None = None) -> list[PlannedRun]:
    """Every run of the sweep, bases first (see the module docstring for names and overrides)."""
    root = Path(root).resolve()
    if iterations < 2:
        raise ConfigError(f"--iterations: must be >= 2, iteration 0 is the shared base (got {iterations})")
    if num_samples is not None and num_samples < 2:
        raise ConfigError(f"--num-samples: must be >= 2, a pair needs two samples (got {num_samples})")
    for o in fixed:
        if "=" not in o:
            raise ConfigError(f"{o}: an override must be key=value")
        if _key(o) in SWEEP_KEYS:
            raise ConfigError(f"{_key(o)}: set by the sweep (use --root, --rho, --selection, --loss, --seeds, "
                              "--iterations), not as an override")
        if num_samples is not None and _key(o) == "generation.num_samples":
            raise ConfigError("generation.num_samples: set by --num-samples for the forks, not as an override")
        if "\t" in o or "\n" in o:
            raise ConfigError(f"{o!r}: overrides may not contain tabs or newlines (plan files are tab-separated)")
    grid = settings(rhos, selections, losses)
    bases, forks = [], []
    for seed in seeds:
        for loss in losses:
            bases.append(_base(root, f"{loss}-seed{seed}", seed=seed, loss=loss, trained=True, fixed=fixed))
        if control:
            bases.append(_base(root, f"notrain-seed{seed}", seed=seed, loss=losses[0], trained=False, fixed=fixed))
    for rho, selection, loss in grid + ([(1.0, "all", None)] if control else []):
        for seed in seeds:
            trained = loss is not None
            base = root / "base" / (f"{loss}-seed{seed}" if trained else f"notrain-seed{seed}")
            n = num_samples if trained else None
            name = (f"runs/rho{_rho_name(rho)}-{selection}-{loss if trained else 'notrain'}"
                    + (f"-n{n}" if n is not None else "") + f"-seed{seed}")
            overrides = _with_fixed(fixed, trained) + ([f"generation.num_samples={n}"] if n is not None else []) + [
                f"seed={seed}", f"optune.rho={rho}", f"optune.selection={selection}",
                f"loss.name={loss if trained else losses[0]}", f"optune.iterations={iterations}",
                f"exp_dir={root / name}", f"init_from={base / 'checkpoints' / 'iter_000000'}"]
            forks.append(PlannedRun(name, root / name, tuple(overrides), "fork", base))
    return bases + forks


def _with_fixed(fixed: list[str], trained: bool) -> list[str]:
    """The fixed overrides; a control run replaces train.epochs_per_iteration with 0."""
    if trained:
        return list(fixed)
    return [o for o in fixed if _key(o) != "train.epochs_per_iteration"] + ["train.epochs_per_iteration=0"]


def _base(root: Path, leaf: str, *, seed: int, loss: str, trained: bool, fixed: list[str]) -> PlannedRun:
    name = f"base/{leaf}"
    # rho and selection do not act at iteration 0; rho=1/all says so in the base's config.yaml. The
    # final Hugging Face export of a base would only cost time: the forks start from its checkpoint.
    overrides = _with_fixed(fixed, trained) + [
        f"seed={seed}", "optune.rho=1.0", "optune.selection=all", f"loss.name={loss}", "optune.iterations=1",
        "policy.export_hf_final=false", f"exp_dir={root / name}"]
    return PlannedRun(name, root / name, tuple(overrides), "base")


def has_init_from() -> bool:
    """Whether this optune_nemo's schema has the `init_from` option the forks need."""
    return "init_from" in {f.name for f in dataclasses.fields(OptuneNemoConfig)}


def check_overrides(plan: list[PlannedRun]) -> None:
    """Compose every distinct setting's config (not per seed) so a wrong key or value stops the sweep
    before its first run; raises ConfigError with Hydra's message as one line."""
    from optune_nemo.config import load_config
    from optune_nemo.runner import config_error_line

    seen = set()
    for run in plan:
        overrides = [o for o in run.overrides if _key(o) not in ("init_from", "exp_dir", "seed")]
        if tuple(overrides) in seen:
            continue
        seen.add(tuple(overrides))
        try:
            load_config(overrides)
        except ConfigError:
            raise
        except Exception as e:
            line = config_error_line(e, OptuneNemoConfig)
            if line is None:
                raise
            raise ConfigError(line) from None


# --------------------------------------------------------------------------- local


def train_command(run: PlannedRun, launcher: list[str]) -> list[str]:
    return [*launcher, "-m", "optune_nemo.train", *run.overrides]


PRUNED = ("model", "rng_states.pt")
"""What --prune removes from a completed fork's checkpoints: the model/optimizer shards and RNG states. The
rollout stores, metrics, evaluation records and manifests (all the report reads) stay."""


def prune_checkpoints(exp_dir: Path) -> int:
    """Delete the PRUNED parts of every checkpoint under exp_dir; returns how many checkpoints were pruned.
    A pruned run can no longer be resumed or forked from (it is COMPLETED, so the sweep never resumes it)."""
    import shutil

    n = 0
    for ckpt in sorted((exp_dir / "checkpoints").glob("iter_*")):
        for name in PRUNED:
            part = ckpt / name
            if part.is_dir():
                shutil.rmtree(part)
            elif part.exists():
                part.unlink()
        n += 1
    return n


def run_local(plan: list[PlannedRun], *, launcher: list[str], dry_run: bool, prune: bool = False) -> int:
    """Every run not COMPLETED, one after another; 0 when all completed, else 1. With `prune`, a fork's
    model shards are deleted once it completed (prune_checkpoints); bases keep theirs (forks start there)."""
    failed: list[str] = []
    for run in plan:
        if run.completed:
            print(f"# done: {run.name}", flush=True)
            continue
        cmd = train_command(run, launcher)
        if dry_run:
            print(shlex.join(cmd), flush=True)
            continue
        if run.base is not None and not (run.base / COMPLETED).is_file():
            log.error("sweep: skipping %s: its base %s did not complete", run.name, run.base)
            failed.append(run.name)
            continue
        log.info("sweep: %s", shlex.join(cmd))
        rc = subprocess.run(cmd).returncode
        if rc != 0 or not run.completed:
            log.error("sweep: %s did not complete (exit code %d)", run.name, rc)
            failed.append(run.name)
        elif prune and run.stage == "fork":
            log.info("sweep: pruned the model shards of %d checkpoint(s) of %s", prune_checkpoints(run.exp_dir),
                     run.name)
    if failed:
        log.error("sweep: %d run(s) did not complete: %s (rerun the same command to resume)", len(failed),
                  ", ".join(failed))
        return 1
    return 0


# --------------------------------------------------------------------------- Slurm


def write_plan(path: Path, runs: list[PlannedRun]) -> None:
    """One run per line, its overrides separated by tabs (slurm/sweep.sh reads line SLURM_ARRAY_TASK_ID + 1)."""
    from optune_nemo.runtime.fileio import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join("\t".join(r.overrides) + "\n" for r in runs))


def _array(n: int, max_running: int | None) -> str:
    return f"--array=0-{n - 1}" + (f"%{max_running}" if max_running else "")


def submit_slurm(plan: list[PlannedRun], root: Path, *, sbatch_args: list[str], max_running: int | None,
                 dry_run: bool) -> tuple[str | None, str | None]:
    """The bases not COMPLETED as one array, the forks not COMPLETED as a second array that waits for the
    first (afterok) and is cancelled if a base fails; returns the two job ids (None: nothing to submit)."""
    root = Path(root).resolve()
    todo = [r for r in plan if not r.completed]
    for r in plan:
        if r.completed:
            print(f"# done: {r.name}", flush=True)
    env = {**os.environ, "OPTUNE_REPO": os.environ.get("OPTUNE_REPO", str(REPO)),
           "OPTUNE_PYTHON": os.environ.get("OPTUNE_PYTHON", sys.executable)}
    script = str(Path(env["OPTUNE_REPO"]) / "slurm" / "sweep.sh")
    ids: dict[str, str | None] = {"base": None, "fork": None}
    for stage in ("base", "fork"):
        runs = [r for r in todo if r.stage == stage]
        if not runs:
            continue
        plan_file = root / "slurm" / f"{stage}.plan"
        cmd = ["sbatch", "--parsable", _array(len(runs), max_running), f"--job-name=optune-sweep-{stage}",
               f"--output={root / 'slurm' / '%x-%A_%a.out'}"]
        if stage == "fork" and ids["base"]:
            cmd += [f"--dependency=afterok:{ids['base']}", "--kill-on-invalid-dep=yes"]
        cmd += [*sbatch_args, script, str(plan_file)]
        if dry_run:
            for i, r in enumerate(runs):
                print(f"# {stage} task {i}: {shlex.join(r.overrides)}", flush=True)
            print(shlex.join(cmd), flush=True)
            ids[stage] = f"<{stage}-job-id>"
            continue
        write_plan(plan_file, runs)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()}")
        ids[stage] = proc.stdout.strip().split(";")[0]
        print(f"submitted {stage} array {ids[stage]}: {len(runs)} run(s), plan {plan_file}", flush=True)
    if not todo:
        print("nothing to do: every run is COMPLETED", flush=True)
    return ids["base"], ids["fork"]


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m optune_nemo.sweep", description=__doc__.splitlines()[0],
        epilog="Overrides for every run go last, after `--`: ... --iterations 4 -- data.num_prompts=256")
    p.add_argument("--root", required=True, help="directory of the sweep's runs")
    p.add_argument("--rho", type=float, nargs="+", required=True, help="optune.rho values")
    p.add_argument("--selection", nargs="+", default=["lowest_reward"],
                   help="optune.selection values for rho < 1 (rho = 1 runs once, as `all`)")
    p.add_argument("--loss", nargs="+", default=["wdpo"], help="loss.name values")
    p.add_argument("--seeds", type=int, nargs="+", required=True, help="seed values")
    p.add_argument("--iterations", type=int, required=True, help="optune.iterations of every fork (>= 2)")
    p.add_argument("--control", action="store_true",
                   help="also a no-training control per seed at rho = 1 (train.epochs_per_iteration=0)")
    p.add_argument("--num-samples", type=int, default=None,
                   help="generation.num_samples of the forks (name suffix -n<N>; the bases keep the default, so "
                        "the forks share iteration 0 with the root's n = 2 forks)")
    p.add_argument("--slurm", action="store_true", help="submit two job arrays instead of running here")
    p.add_argument("--sbatch-args", default="",
                   help="extra sbatch options, e.g. '--gpus-per-node=8 --time=8:00:00' (a single one as "
                        "--sbatch-args=--gpus-per-node=8)")
    p.add_argument("--max-running", type=int, default=None, help="Slurm: at most this many tasks of an array at once")
    p.add_argument("--launcher", default=shlex.quote(sys.executable),
                   help="local: what runs `-m optune_nemo.train`, e.g. 'torchrun --nproc-per-node=8'")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--prune", action="store_true",
                   help="local: once a fork completed, delete its checkpoints' model and optimizer shards (keeps "
                        "rollouts, metrics and evaluation: what the report reads); a pruned run cannot be resumed "
                        "or forked from")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from optune_nemo.runtime.console import setup_logging

    setup_logging(0, "INFO", run_log=False)   # every run keeps its libraries' output in its exp_dir/logs
    try:
        plan = plan_sweep(args.root, rhos=args.rho, selections=args.selection, losses=args.loss, seeds=args.seeds,
                          iterations=args.iterations, control=args.control, fixed=args.overrides,
                          num_samples=args.num_samples)
        if not args.dry_run:
            if not has_init_from():
                raise ConfigError("init_from: this optune_nemo has no init_from option, which the sweep's forks "
                                  "need to start from their base run")
            check_overrides(plan)
            hold_run_dir(Path(args.root))   # one sweep per root (each run also locks its own exp_dir)
        if args.slurm:
            submit_slurm(plan, Path(args.root), sbatch_args=shlex.split(args.sbatch_args),
                         max_running=args.max_running, dry_run=args.dry_run)
            return 0
        return run_local(plan, launcher=shlex.split(args.launcher), dry_run=args.dry_run, prune=args.prune)
    except ConfigError as e:
        print(f"optune_nemo.analysis.sweep: configuration error: {e}", file=sys.stderr)
        return 2
    except RunDirBusy as e:
        print(f"optune_nemo.analysis.sweep: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
