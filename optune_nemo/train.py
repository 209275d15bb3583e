"""Hydra entry point: `python -m optune_nemo.train key=value ...`, and the OPTune builders.

config -> resolve the model source -> validate -> check inputs (`check_inputs`) -> the runner
(`runner.run_training`: guard, distributed, builders, first write, resume) -> OPTune.fit() -> summary.
The builders: `build_policy_parts` (process groups, tokenizer, policy: also what `generate`, the benchmarks
and the GPU tests build), `engine_for` (the engine on them) and `OptuneRun` (the rest, `runner.Recipe`):

    cfg = runner.resolve(cfg)                          # model.* from policy.hf_path; no file written
    parts = build_policy_parts(cfg, load_weights=True) # dist, hf_dir, tokenizer, policy
    engine = engine_for(cfg, parts)                    # generation.engine on the policy

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
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig

from optune_nemo import runner
from optune_nemo.config import CONF_DIR, ConfigError, OptuneNemoConfig, register_schema, validate
from optune_nemo.runner import (
    Assembly,
    ModelPart,
    Recipe,
    captured,
    load_tokenizer,
    prepare_source,
    resolve,
    run_hydra_main,
    run_in_run_dir,
    to_config,
)
from optune_nemo.runtime.rundir import world_size_from_env

if TYPE_CHECKING:
    from optune_nemo.algorithm.optune import OPTune
    from optune_nemo.evaluation.heldout import Evaluator
    from optune_nemo.interfaces import Outcome, Policy

log = logging.getLogger("optune_nemo.train")


def check_plugins(cfg: OptuneNemoConfig) -> None:
    """The plugin families' checks, section by section (optune, loss, generation, reward, data): which selection
    strategies, losses, engines, reward types and tasks exist, and what a chosen member needs of the rest of
    the configuration. `config.validate` checks what each section decides on its own, so config.py imports no
    family. Raises ConfigError naming the key and the allowed values (a `module:attribute` selection strategy is
    imported here; a `module:Class` loss when the loss is built)."""
    from optune_nemo import generation, losses, reward, selection
    from optune_nemo.data import tasks

    selection.check(cfg.optune)
    losses.check(cfg.loss)
    generation.check(cfg.generation, hf_path=cfg.policy.hf_path)
    reward.check(cfg.reward)
    tasks.check(cfg.data)


def check_inputs(cfg: OptuneNemoConfig, *, world_size: int) -> OptuneNemoConfig:
    """Everything about the configuration that can be checked before any file is written: the model
    source's shape (read from its config.json or GGUF header), every value, the engine's availability.
    Returns the configuration with model.* taken from the source. Raises ConfigError."""
    from optune_nemo.generation import check_engine_available

    cfg = resolve(cfg)
    validate(cfg, world_size=world_size)
    check_plugins(cfg)
    check_engine_available(cfg.generation, world_size=world_size)
    if cfg.eval.num_prompts and cfg.eval.judge == "llm":
        from optune_nemo.evaluation.judge import build_judge

        build_judge(cfg.eval).check()     # a refused key or model surfaces now, not after iteration 0
    if cfg.reward.type == "remote":
        from optune_nemo.reward.remote import check_reachable

        check_reachable(cfg.reward)       # a server that does not answer: exit 2 before the first write
    return cfg


# --------------------------------------------------------------------------- the policy and its engine


@dataclasses.dataclass
class PolicyParts:
    """The policy and what it is built on: the process groups, the source's HF directory (None: the tiny
    random model of model.*) and the tokenizer."""

    dist: object
    hf_dir: Path | None
    tokenizer: object
    policy: Policy
    """A `megatron.megatron_policy.MegatronPolicy`."""


def build_policy_parts(cfg: OptuneNemoConfig, *, hf_dir: Path | None = None, tokenizer=None,
                       load_weights: bool = True) -> PolicyParts:
    """Process groups, then the megatron policy on `cfg.model` (already `runner.resolve`d); with
    `load_weights` the source model's weights are loaded (a resumed run loads its checkpoint instead)."""
    from optune_nemo.megatron.megatron_policy import build_policy
    from optune_nemo.megatron.parallel import init_distributed

    p = cfg.parallel
    dist = init_distributed(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                            timeout_minutes=p.distributed_timeout_minutes)
    if hf_dir is None:
        hf_dir = prepare_source(cfg)
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg, hf_dir)
    policy = build_policy(cfg, vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id, dist=dist,
                          hf_dir=hf_dir)
    if load_weights and hf_dir is not None:
        policy.load_hf_weights(hf_dir)
    return PolicyParts(dist, hf_dir, tokenizer, policy)


def engine_for(cfg: OptuneNemoConfig, parts: PolicyParts):
    """The engine `generation.engine` names, on the parts' policy (`generation.build_engine`)."""
    from optune_nemo.generation import build_engine

    return build_engine(cfg.generation, policy=parts.policy, tokenizer=parts.tokenizer, dist=parts.dist,
                        hf_dir=parts.hf_dir, max_sequence_length=cfg.model.seq_length)


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


@dataclasses.dataclass
class ExportEachIteration:
    """After-iteration hook (`policy.export_hf_every_iteration`): the policy as exp_dir/hf/iter_NNNNNN."""

    policy: Policy
    out_dir: Path
    tokenizer: object

    def __call__(self, t: int) -> None:
        self.policy.export_hf(self.out_dir / f"iter_{t:06d}", tokenizer=self.tokenizer)


# --------------------------------------------------------------------------- the run


@dataclasses.dataclass
class OptuneRun(Recipe):
    """An OPTune run: the trainer-specific part the runner builds (`runner.Recipe`), and once built what the
    entry point needs of it: `loop` (ready to `fit`), the policy's `parts` and the held-out `evaluator`.
    `cfg` has passed `check_inputs`; the prompt files and the reward are read before exp_dir is first written."""

    cfg: OptuneNemoConfig
    parts: PolicyParts | None = None
    loop: OPTune | None = None
    evaluator: Evaluator | None = None
    """None without held-out prompts (eval.num_prompts=0)."""
    prompts: list = dataclasses.field(default_factory=list)
    """The training prompts, the held-out ones and the reward: read in `prepare`, used in `assemble`."""
    heldout: list = dataclasses.field(default_factory=list)
    reward: object = None
    log = log

    def prepare(self) -> int:
        from optune_nemo.data import load_prompts
        from optune_nemo.reward import build_reward

        cfg = self.cfg
        hf_dir = prepare_source(cfg)
        tokenizer = load_tokenizer(cfg, hf_dir)
        self.prompts = load_prompts(cfg.data, tokenizer)
        self.heldout = heldout_prompts(cfg, tokenizer)
        self.parts = build_policy_parts(cfg, hf_dir=hf_dir, tokenizer=tokenizer, load_weights=False)
        self.reward = build_reward(cfg.reward, dist=self.parts.dist)
        return self.parts.dist.rank

    def assemble(self, *, guard, metrics, checkpoints) -> Assembly:
        from optune_nemo.algorithm.optune import OPTune
        from optune_nemo.algorithm.store import RolloutStore
        from optune_nemo.losses import build_loss
        from optune_nemo.runtime.checkpoint import GenerationChunks

        cfg, parts = self.cfg, self.parts
        engine = engine_for(cfg, parts)
        store = RolloutStore(self.prompts)
        self.loop = OPTune(cfg, prompts=self.prompts, policy=parts.policy, engine=engine, reward=self.reward,
                           loss=build_loss(cfg.loss), store=store, chunks=GenerationChunks(cfg.exp_dir),
                           checkpoints=checkpoints, metrics=metrics, guard=guard,
                           stop_token_ids=parts.tokenizer.stop_token_ids)
        later = {}
        if self.heldout:
            self.evaluator = self._evaluator(engine)
            self.loop.after_iteration.append(self.evaluator)
            later["eval"] = self.evaluator
        if parts.hf_dir is not None and cfg.policy.export_hf_every_iteration:
            self.loop.after_iteration.append(
                ExportEachIteration(parts.policy, Path(cfg.exp_dir) / "hf", parts.tokenizer))
        return Assembly(self.loop, {"model": ModelPart(parts.policy), "rollouts": store}, later)

    def _evaluator(self, engine):
        from optune_nemo.data.tasks import get_task
        from optune_nemo.evaluation.heldout import Evaluator, gold_reward
        from optune_nemo.evaluation.judge import build_judge

        cfg, parts = self.cfg, self.parts
        builtin = cfg.data.path is None and cfg.eval.path is None
        return Evaluator(cfg, engine=engine, reward=gold_reward(cfg, parts.dist), judge=build_judge(cfg.eval),
                         prompts=self.heldout, stop_token_ids=parts.tokenizer.stop_token_ids,
                         task=get_task(cfg.data.task) if builtin else None)

    def init_from(self) -> Path | None:
        """`init_from`: another run's checkpoint to start from (the sweep's forks of one iteration 0)."""
        return None if self.cfg.init_from is None else Path(self.cfg.init_from)

    def begin(self, restored: Path | None) -> None:
        """A fresh start takes the source model's weights; the held-out baseline (the starting policy's
        answers) is generated once, before the first iteration."""
        if restored is None and self.parts.hf_dir is not None:
            self.parts.policy.load_hf_weights(self.parts.hf_dir)
        if self.evaluator is not None:
            self.evaluator.ensure_baseline()

    def finish(self) -> None:
        if self.parts.hf_dir is not None and self.cfg.policy.export_hf_final:
            self.parts.policy.export_hf(Path(self.cfg.exp_dir) / "hf" / "final", tokenizer=self.parts.tokenizer)

    def summarize(self) -> None:
        summarize(Path(self.cfg.exp_dir))


def build_loop(cfg: OptuneNemoConfig) -> OptuneRun:
    """Every component, and resume (`runner.build`): the run, its `loop` ready to `fit()`. `cfg` has passed
    `check_inputs`."""
    run = OptuneRun(cfg)
    runner.build(run)
    return run


def run_training(cfg: OptuneNemoConfig) -> Outcome:
    """Everything after validation (`runner.run_training`): COMPLETED or PREEMPTED."""
    return runner.run_training(OptuneRun(cfg))


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
    cfg = check_inputs(to_config(dcfg, OptuneNemoConfig), world_size=world_size_from_env())
    run_in_run_dir(OptuneRun(cfg))


def main() -> int:
    """`python -m optune_nemo.train`: Hydra's command line with this module's exit codes (docstring)."""
    return run_hydra_main(_hydra_main, prog="optune_nemo")


if __name__ == "__main__":
    sys.exit(main())
