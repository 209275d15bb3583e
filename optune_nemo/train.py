"""Hydra entry point: `python -m optune_nemo.train key=value ...`.

config -> resolve the model source -> validate -> check inputs -> (first write) -> distributed ->
builders -> resume -> OPTune.fit() -> summary.

Exit codes:
  0  finished, or stopped cleanly for pre-emption (then `exp_dir/COMPLETED` is absent);
  2  the user's configuration, files or functions are wrong: one line on stderr naming the key or
     file and what is allowed, no traceback, and nothing this invocation created is left in exp_dir
     (everything that can be checked is checked before the first write; a later failure removes what
     the invocation wrote);
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

from optune_nemo.cli import captured, run_hydra_main
from optune_nemo.config import (
    CONF_DIR,
    ConfigError,
    OptuneNemoConfig,
    config_to_yaml,
    register_schema,
    validate,
)
from optune_nemo.rundir import RunDir, rank_from_env, world_size_from_env

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
        from optune_nemo.judge import build_judge

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
    from optune_nemo.checkpoint import CheckpointManager, RngStates
    from optune_nemo.console import setup_logging
    from optune_nemo.data import load_prompts
    from optune_nemo.metrics import MetricsWriter
    from optune_nemo.preemption import PreemptionGuard
    from optune_nemo.reward import build_reward

    guard = PreemptionGuard()   # first: a signal during start-up must not kill the job
    setup_logging(rank_from_env(), cfg.logging.level)
    hf_dir = prepare_source(cfg)
    tokenizer = load_tokenizer(cfg, hf_dir)
    prompts = load_prompts(cfg.data, tokenizer)
    heldout = heldout_prompts(cfg, tokenizer)
    exp_dir = Path(cfg.exp_dir)
    parts = build_policy_parts(cfg, hf_dir=hf_dir, tokenizer=tokenizer, load_weights=False)
    reward = build_reward(cfg.reward, dist=parts.dist)
    if parts.dist.rank == 0:                 # the first write of the run
        exp_dir.mkdir(parents=True, exist_ok=True)
        (exp_dir / "config.yaml").write_text(config_to_yaml(cfg))
    engine = build_engine(cfg, parts)
    store = RolloutStore(prompts)
    metrics = MetricsWriter(exp_dir, tensorboard=cfg.logging.tensorboard, enabled=parts.dist.rank == 0)
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
        from optune_nemo.evaluation import Evaluator, gold_reward
        from optune_nemo.judge import build_judge

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
    (recorded in exp_dir/fork.json); returns the checkpoint restored, or None to start fresh."""
    if cfg.resume == "never":
        if checkpoints.complete_checkpoints():
            raise ConfigError(f"resume: never, but {checkpoints.root} already holds checkpoints; "
                              "use resume=auto or another exp_dir")
        directory = None
    else:
        directory = Path(cfg.resume) if cfg.resume != "auto" else checkpoints.latest_valid()
    if directory is not None:
        log.info("resuming from %s", directory)
        checkpoints.restore(directory)
        return directory
    if cfg.init_from is None:
        return None
    source = Path(cfg.init_from).expanduser().resolve()
    from optune_nemo.checkpoint import verify_manifest

    problem = verify_manifest(source)
    if problem is not None:
        raise ConfigError(f"init_from: {source} is not a usable checkpoint ({problem})")
    log.info("starting from %s (init_from)", source)
    checkpoints.restore(source)
    if rank_from_env() == 0:
        from optune_nemo.algorithm.optune import read_trainer_state
        from optune_nemo.fileio import write_json_atomic

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
    """The end-of-run summary, and the reward plot."""
    from optune_nemo.evaluation import plot_rewards, read_eval
    from optune_nemo.metrics import read_metrics

    records = read_metrics(exp_dir)
    if not records:
        return
    gen = sum(r["time_generation_s"] for r in records)
    total = sum(r["time_total_s"] for r in records)
    log.info("done: %d iterations, %d prompts regenerated, chosen reward %.4f -> %.4f, "
             "generation %.1f s of %.1f s (%.0f %%)", len(records),
             sum(r["regenerated"] for r in records), records[0]["reward_chosen_mean"],
             records[-1]["reward_chosen_mean"], gen, total, 100 * gen / max(total, 1e-9))
    evals = read_eval(exp_dir)
    if evals.get("baseline") and evals.get("iterations"):
        b = evals["baseline"]
        a = evals["iterations"][max(evals["iterations"], key=int)]
        log.info("held-out (%d prompts): mean reward %.4f -> %.4f%s, win score %.1f", a["num_prompts"],
                 b["reward_mean"], a["reward_mean"],
                 f", accuracy {b['accuracy']:.3f} -> {a['accuracy']:.3f}" if "accuracy" in a else "", a["win_score"])
    log.info("plot: %s", plot_rewards(exp_dir, records, evals))


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
