"""Hydra entry point: `python -m optune_nemo.train key=value ...`.

config -> validate -> distributed -> builders -> resume -> OPTune.fit() -> summary.
Exit codes: 0 finished or stopped cleanly for pre-emption (then `exp_dir/COMPLETED` is absent),
2 bad configuration or input (one line naming the key), 1 anything else.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from optune_nemo.config import CONF_DIR, ConfigError, OptuneNemoConfig, register_schema, validate

log = logging.getLogger("optune_nemo.train")

COMPLETED = "COMPLETED"


def world_size_from_env() -> int:
    """The world size before any process group exists (torchrun, then Slurm, else 1)."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 1


def to_config(dcfg: DictConfig) -> OptuneNemoConfig:
    cfg = OmegaConf.to_object(dcfg)
    assert isinstance(cfg, OptuneNemoConfig)
    return cfg


def build_loop(cfg: OptuneNemoConfig):
    """Distributed set-up, every component, and resume: the OPTune loop ready to `fit()`.
    `cfg.model` is replaced by the pretrained model's shape when `policy.hf_path` is set."""
    from optune_nemo.algorithm.optune import OPTune
    from optune_nemo.algorithm.store import RolloutStore
    from optune_nemo.checkpoint import CheckpointManager
    from optune_nemo.data import ByteTokenizer, load_prompts
    from optune_nemo.distributed import init_distributed
    from optune_nemo.generation import build_engine
    from optune_nemo.logging import MetricsWriter, setup_logging
    from optune_nemo.policy.megatron_policy import build_policy
    from optune_nemo.preemption import PreemptionGuard
    from optune_nemo.reward.base import build_reward

    guard = PreemptionGuard()   # first: a signal during start-up must not kill the job
    dist = init_distributed(cfg.parallel.tensor_model_parallel_size,
                            cfg.parallel.pipeline_model_parallel_size)
    setup_logging(dist.rank, cfg.logging.level)
    exp_dir = Path(cfg.exp_dir)
    if dist.rank == 0:
        exp_dir.mkdir(parents=True, exist_ok=True)
    hf_dir = None
    if cfg.policy.hf_path is not None:
        from optune_nemo.data.hf_tokenizer import HFTokenizer
        from optune_nemo.policy.pretrained import pretrained_model_config, resolve_hf_dir

        hf_dir = resolve_hf_dir(cfg.policy.hf_path, exp_dir, rank=dist.rank)
        cfg.model = pretrained_model_config(cfg, hf_dir)
        tokenizer = HFTokenizer.from_pretrained(hf_dir, chat_template=cfg.policy.chat_template,
                                                stop_tokens=cfg.policy.stop_tokens)
    else:
        tokenizer = ByteTokenizer()
    if dist.rank == 0:
        (exp_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    prompts = load_prompts(cfg.data, tokenizer)
    policy = build_policy(cfg, vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id, dist=dist)
    engine = build_engine(cfg.generation, policy=policy, tokenizer=tokenizer, dist=dist,
                          vocab_size=tokenizer.vocab_size, max_sequence_length=cfg.model.seq_length,
                          hf_dir=hf_dir)
    store = RolloutStore(prompts)
    checkpoints = CheckpointManager(exp_dir, keep_last=cfg.checkpoint.keep_last)
    metrics = MetricsWriter(exp_dir, tensorboard=cfg.logging.tensorboard, enabled=dist.rank == 0)
    next_iteration = resume(cfg, checkpoints, policy, store)
    if next_iteration == 0 and hf_dir is not None:
        from optune_nemo.policy.pretrained import load_pretrained_weights

        load_pretrained_weights(policy, hf_dir)
    metrics.truncate_from(next_iteration)
    reward = build_reward(cfg.reward)
    if dist.world_size > 1:
        from optune_nemo.reward.base import ShardedReward

        reward = ShardedReward(reward, rank=dist.rank, world_size=dist.world_size)
    loop = OPTune(cfg, prompts=prompts, policy=policy, engine=engine, reward=reward,
                  store=store, checkpoints=checkpoints, metrics=metrics, guard=guard,
                  stop_token_ids=tokenizer.stop_token_ids, next_iteration=next_iteration)
    loop.tokenizer, loop.hf_dir = tokenizer, hf_dir
    if hf_dir is not None and cfg.policy.export_hf_every_iteration:
        from optune_nemo.policy.pretrained import export_policy

        loop.callbacks.append(lambda t: export_policy(policy, hf_dir, exp_dir / "hf" / f"iter_{t:06d}",
                                                      tokenizer=tokenizer))
    return loop


def build_and_fit(cfg: OptuneNemoConfig) -> str:
    """Everything after validation. Returns `completed` or `preempted`."""
    loop = build_loop(cfg)
    exp_dir, rank = Path(cfg.exp_dir), loop.policy.dist.rank
    heldout = heldout_prompts(cfg, loop.tokenizer)
    if heldout and loop.next_iteration == 0:
        run_eval(loop, heldout, "before")
    outcome = loop.fit()
    loop.metrics.close()
    if outcome != "completed":
        return outcome
    if heldout:
        run_eval(loop, heldout, "after")
    if loop.hf_dir is not None and cfg.policy.export_hf_final:
        from optune_nemo.policy.pretrained import export_policy

        export_policy(loop.policy, loop.hf_dir, exp_dir / "hf" / "final", tokenizer=loop.tokenizer)
    if rank == 0:
        (exp_dir / COMPLETED).write_text("ok\n")
        summarize(exp_dir)
    return outcome


def heldout_prompts(cfg: OptuneNemoConfig, tokenizer):
    from dataclasses import replace

    from optune_nemo.data import load_prompts

    if not cfg.eval.num_prompts:
        return []
    return load_prompts(replace(cfg.data, num_prompts=cfg.eval.num_prompts), tokenizer, split="heldout")


def run_eval(loop, prompts, key: str) -> None:
    from optune_nemo.evaluation import evaluate, write_eval

    result = evaluate(loop.engine, loop.reward, prompts, max_new_tokens=loop.cfg.eval.max_new_tokens,
                      stop_token_ids=loop.tokenizer.stop_token_ids)
    if loop.policy.dist.rank == 0:
        write_eval(Path(loop.cfg.exp_dir), key, result)
    log.info("held-out %s: accuracy %.3f, mean reward %.4f (%d prompts)", key, result["accuracy"],
             result["reward_mean"], result["num_prompts"])


def resume(cfg: OptuneNemoConfig, checkpoints, policy, store) -> int:
    """Restore the newest complete checkpoint (per `resume`) and return the next iteration."""
    from optune_nemo.algorithm.store import RolloutStore

    if cfg.resume == "never":
        if checkpoints.complete_checkpoints():
            raise ConfigError(f"resume: never, but {checkpoints.root} already holds checkpoints; "
                              "use resume=auto or another exp_dir")
        return 0
    directory = Path(cfg.resume) if cfg.resume != "auto" else checkpoints.latest_valid()
    if directory is None:
        return 0
    log.info("resuming from %s", directory)
    policy.load_checkpoint(str(directory / "model"))
    store.load_state_dict(RolloutStore.from_parquet(directory / "rollouts.parquet").state_dict())
    return checkpoints.load_trainer_state(directory)["next_iteration"]


def summarize(exp_dir: Path) -> None:
    """The end-of-run summary, and the reward plot."""
    from optune_nemo.evaluation import plot_rewards, read_eval
    from optune_nemo.logging import read_metrics

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
    if "before" in evals and "after" in evals:
        b, a = evals["before"], evals["after"]
        log.info("held-out (%d prompts): accuracy %.3f -> %.3f, mean reward %.4f -> %.4f",
                 a["num_prompts"], b["accuracy"], a["accuracy"], b["reward_mean"], a["reward_mean"])
    log.info("plot: %s", plot_rewards(exp_dir, records, evals))


register_schema()


@hydra.main(config_path=str(CONF_DIR), config_name="optune", version_base=None)
def main(dcfg: DictConfig) -> None:
    try:
        cfg = to_config(dcfg)
        validate(cfg, world_size=world_size_from_env())
        build_and_fit(cfg)
    except ConfigError as e:
        print(f"optune_nemo: configuration error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
