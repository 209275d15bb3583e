"""Hydra entry point: `python -m optune_nemo.train key=value ...`.

config -> resolve the model source -> validate -> check inputs -> (first write) -> distributed ->
builders -> resume -> OPTune.fit() -> summary.

Exit codes:
  0  finished, or stopped cleanly for pre-emption (then `exp_dir/COMPLETED` is absent);
  2  the user's configuration, files or functions are wrong: one line on stderr naming the key or
     file and what is allowed, no traceback, and nothing this invocation created is left in exp_dir
     (everything that can be checked is checked before the first write; a later failure removes what
     the invocation wrote).
     Also when another run holds exp_dir (its lock, `exp_dir/.lock`): one line naming exp_dir and the
     holder (host, pid, Slurm job id), and nothing is written;
  3  a checkpoint is damaged, incomplete or unsafe (manifest mismatch, missing shard, an object the
     weights-only loader refuses, a pickle global outside checkpoint metadata): one line naming the file,
     nothing loaded from it. With resume=auto a damaged newest checkpoint is skipped with a warning and
     the previous complete one is used; exit 3 only when none is usable, or for a named one;
  1  anything else: an infrastructure failure that a rerun can resume from (a reward server that stays
     unreachable, or a file system without room for the next checkpoint: one line, checked before the
     checkpoint is written), or a bug (a traceback).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from optune_nemo.config import (
    CONF_DIR,
    ConfigError,
    OptuneNemoConfig,
    config_to_yaml,
    register_schema,
    validate,
)
from optune_nemo.runner import captured, run_hydra_main
from optune_nemo.runtime.rundir import RunDir, hold_run_dir, rank_from_env, world_size_from_env

log = logging.getLogger("optune_nemo.train")

COMPLETED = "COMPLETED"


def to_config(dcfg: DictConfig) -> OptuneNemoConfig:
    cfg = OmegaConf.to_object(dcfg)
    assert isinstance(cfg, OptuneNemoConfig)
    return cfg


def check_inputs(cfg: OptuneNemoConfig, *, world_size: int) -> OptuneNemoConfig:
    """Everything about the configuration that can be checked before any file is written: the model
    source's shape (read from its config.json or GGUF header), every value, the engine's availability.
    Returns the configuration with model.* taken from the source. Raises ConfigError."""
    from optune_nemo.build import resolve
    from optune_nemo.generation import check_engine_available

    cfg = resolve(cfg)
    validate(cfg, world_size=world_size)
    check_engine_available(cfg.generation, world_size=world_size)
    if cfg.eval.num_prompts and cfg.eval.judge == "llm":
        from optune_nemo.evaluation.judge import build_judge

        build_judge(cfg.eval).check()     # a refused key or model surfaces now, not after iteration 0
    if cfg.reward.type == "remote":
        from optune_nemo.reward.remote import check_reachable

        check_reachable(cfg.reward)       # a server that does not answer: exit 2 before the first write
    return cfg


def build_loop(cfg: OptuneNemoConfig):
    """Every component, and resume: the OPTune loop ready to `fit()`. `cfg` has passed `check_inputs`.
    Prompt files and the reward are checked before exp_dir is first written."""
    from optune_nemo.algorithm.optune import OPTune
    from optune_nemo.algorithm.store import RolloutStore
    from optune_nemo.build import build_engine, build_policy_parts, load_tokenizer, prepare_source
    from optune_nemo.data import load_prompts
    from optune_nemo.reward import build_reward
    from optune_nemo.runtime.checkpoint import CheckpointManager, RngStates
    from optune_nemo.runtime.console import log_to, setup_logging
    from optune_nemo.runtime.metrics import MetricsWriter
    from optune_nemo.runtime.preemption import PreemptionGuard

    guard = PreemptionGuard()   # first: a signal during start-up must not kill the job
    setup_logging(rank_from_env(), cfg.logging.level)
    hf_dir = prepare_source(cfg)
    tokenizer = load_tokenizer(cfg, hf_dir)
    prompts = load_prompts(cfg.data, tokenizer)
    heldout = heldout_prompts(cfg, tokenizer)
    exp_dir = Path(cfg.exp_dir)
    parts = build_policy_parts(cfg, hf_dir=hf_dir, tokenizer=tokenizer, load_weights=False)
    reward = build_reward(cfg.reward, dist=parts.dist)
    hold_run_dir(exp_dir, rank=parts.dist.rank)   # one writer per exp_dir, before the first write
    if parts.dist.rank == 0:                 # the first write of the run
        exp_dir.mkdir(parents=True, exist_ok=True)
        (exp_dir / "config.yaml").write_text(config_to_yaml(cfg))
    log_to(exp_dir / "logs")                 # exp_dir/logs/rank<R>.log: libraries' output, from process start
    engine = build_engine(cfg, parts)
    store = RolloutStore(prompts)
    metrics = MetricsWriter.from_config(cfg, enabled=parts.dist.rank == 0)
    checkpoints = CheckpointManager(exp_dir, keep_last=cfg.checkpoint.keep_last)
    loop = OPTune(cfg, prompts=prompts, policy=parts.policy, engine=engine, reward=reward, store=store,
                  checkpoints=checkpoints, metrics=metrics, guard=guard, stop_token_ids=tokenizer.stop_token_ids)
    checkpoints.register("model", ModelState(parts.policy))
    checkpoints.register("rollouts", store)
    checkpoints.register("trainer", loop)
    checkpoints.register("rng", RngStates())
    checkpoints.register("metrics", metrics)
    evaluator = None
    if heldout:
        from optune_nemo.data.tasks import get_task
        from optune_nemo.evaluation.heldout import Evaluator, gold_reward
        from optune_nemo.evaluation.judge import build_judge

        builtin = cfg.data.path is None and cfg.eval.path is None
        evaluator = Evaluator(cfg, engine=engine, reward=gold_reward(cfg, parts.dist), judge=build_judge(cfg.eval),
                              prompts=heldout, stop_token_ids=tokenizer.stop_token_ids,
                              task=get_task(cfg.data.task) if builtin else None)
        checkpoints.register("eval", evaluator)
        loop.after_iteration.append(evaluator)
    resumed = resume(cfg, checkpoints)
    if not resumed:
        metrics.start_fresh()
        if hf_dir is not None:
            parts.policy.load_hf_weights(hf_dir)
    loop.tokenizer, loop.hf_dir, loop.evaluator = tokenizer, hf_dir, evaluator
    if hf_dir is not None and cfg.policy.export_hf_every_iteration:
        loop.after_iteration.append(
            lambda t: parts.policy.export_hf(exp_dir / "hf" / f"iter_{t:06d}", tokenizer=tokenizer) and None)
    return loop


class ModelState:
    """The policy as a checkpoint part: model and optimizer, sharded, under `model/`."""

    def __init__(self, policy):
        self.policy = policy

    def save(self, directory: Path) -> None:
        self.policy.save_checkpoint(str(directory / "model"))

    def load(self, directory: Path) -> None:
        self.policy.load_checkpoint(str(directory / "model"))


def resume(cfg: OptuneNemoConfig, checkpoints) -> Path | None:
    """Restore the newest complete checkpoint (per `resume`), else the `init_from` checkpoint of another run
    (recorded in exp_dir/fork.json); returns the checkpoint restored, or None to start fresh. Every
    checkpoint is screened before anything is loaded from it (`checkpoint.checkpoint_problem`): with
    resume=auto a damaged newest one is skipped with a warning, a named one (resume=<path>, init_from)
    stops the run with a CheckpointError naming the file."""
    if cfg.resume == "never":
        if checkpoints.complete_checkpoints():
            raise ConfigError(f"resume: never, but {checkpoints.root} already holds checkpoints; "
                              "use resume=auto or another exp_dir")
        directory = None
    else:
        directory = checkpoints.checked(cfg.resume) if cfg.resume != "auto" else checkpoints.latest_valid()
    if directory is not None:
        log.info("resuming from %s", directory)
        checkpoints.restore(directory)
        return directory
    if cfg.init_from is None:
        return None
    source = checkpoints.checked(Path(cfg.init_from).expanduser().resolve())
    log.info("starting from %s (init_from)", source)
    checkpoints.restore(source)
    if rank_from_env() == 0:
        from optune_nemo.algorithm.optune import read_trainer_state
        from optune_nemo.runtime.fileio import write_json_atomic

        write_json_atomic(Path(cfg.exp_dir) / "fork.json",
                          {"init_from": str(source), "iteration": read_trainer_state(source)[0] - 1})
    return source


def heldout_prompts(cfg: OptuneNemoConfig, tokenizer):
    """eval.num_prompts held-out prompts: the first rows of eval.path, or the built-in task's held-out split."""
    from optune_nemo.data import load_prompts

    if not cfg.eval.num_prompts:
        return []
    data = dataclasses.replace(cfg.data, num_prompts=cfg.eval.num_prompts, path=cfg.eval.path)
    try:
        return load_prompts(data, tokenizer, split="heldout")
    except ConfigError as e:
        raise ConfigError(str(e).replace("data.path", "eval.path", 1) if cfg.eval.path else str(e)) from None


def run_training(cfg: OptuneNemoConfig) -> str:
    """Everything after validation. Returns `completed` or `preempted`."""
    loop = build_loop(cfg)
    exp_dir, rank = Path(cfg.exp_dir), loop.policy.dist.rank
    if loop.evaluator is not None:
        loop.evaluator.ensure_baseline()        # the starting policy's answers, once
    outcome = loop.fit()
    loop.metrics.close()
    if outcome != "completed":
        return outcome
    if loop.hf_dir is not None and cfg.policy.export_hf_final:
        loop.policy.export_hf(exp_dir / "hf" / "final", tokenizer=loop.tokenizer)
    if rank == 0:
        (exp_dir / COMPLETED).write_text("ok\n")
        summarize(exp_dir)
    return outcome


def summarize(exp_dir: Path) -> None:
    """The end-of-run summary on the console (a table: one iteration a row, its held-out result beside it;
    then the totals and where everything is), and the reward plot."""
    from optune_nemo.evaluation.heldout import plot_rewards, read_eval
    from optune_nemo.runtime.metrics import read_metrics

    records = read_metrics(exp_dir)
    if not records:
        return
    evals = read_eval(exp_dir)
    heldout = evals.get("iterations", {}) if evals.get("baseline") else {}
    rows = [["iteration", "regenerated", "tokens", "generation s", "reference s", "train s", "total s",
             "chosen reward", "pairs", *(["held-out reward", "win score"] if heldout else [])]]
    if heldout:
        rows.append(["start", *[""] * 8, f"{evals['baseline']['reward_mean']:.3f}", ""])
    for r in records:
        ev = heldout.get(str(r["iteration"]))
        rows.append([str(r["iteration"]), str(r["regenerated"]), str(r["generated_tokens"]),
                     *(f"{r[k]:.1f}" for k in ("time_generation_s", "time_reference_s", "time_train_s",
                                                "time_total_s")),
                     f"{r['reward_chosen_mean']:.3f}", str(r["train_pairs"]),
                     *([f"{ev['reward_mean']:.3f}", f"{ev['win_score']:.1f}"] if ev else ["", ""] if heldout else [])])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    gen = sum(r["time_generation_s"] for r in records)
    total = sum(r["time_total_s"] for r in records)
    lines.append(f"done: {len(records)} iterations, {sum(r['regenerated'] for r in records)} prompts regenerated, "
                 f"chosen reward {records[0]['reward_chosen_mean']:.4f} -> {records[-1]['reward_chosen_mean']:.4f}, "
                 f"generation {gen:.1f} s of {total:.1f} s ({100 * gen / max(total, 1e-9):.0f} %)")
    if heldout:
        b, a = evals["baseline"], heldout[max(heldout, key=int)]
        accuracy = f", accuracy {b['accuracy']:.3f} -> {a['accuracy']:.3f}" if "accuracy" in a else ""
        lines.append(f"held-out ({a['num_prompts']} prompts): mean reward {b['reward_mean']:.4f} -> "
                     f"{a['reward_mean']:.4f}{accuracy}, win score {a['win_score']:.1f}")
    lines.append(f"plot: {plot_rewards(exp_dir, records, evals)}; libraries' output: {exp_dir / 'logs'}")
    log.info("run summary (%s)\n%s", exp_dir, "\n".join(lines))


# --------------------------------------------------------------------------- command line


register_schema()


@hydra.main(config_path=str(CONF_DIR), config_name="optune", version_base=None)
@captured
def _hydra_main(dcfg: DictConfig) -> None:
    cfg = check_inputs(to_config(dcfg), world_size=world_size_from_env())
    with RunDir(cfg.exp_dir, rank=rank_from_env()):
        run_training(cfg)


def main() -> int:
    """`python -m optune_nemo.train`: Hydra's command line with this module's exit codes (docstring)."""
    return run_hydra_main(_hydra_main, prog="optune_nemo")


if __name__ == "__main__":
    sys.exit(main())
