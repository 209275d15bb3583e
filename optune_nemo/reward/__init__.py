"""Rewards behind one protocol (`interfaces.Reward`), chosen by `reward.type`: each type is one module
of this package whose `build(cfg: RewardConfig, *, dist) -> Reward` registers itself in `REWARD_TYPES`.

    rule      reward/base.py      a Python function (rule-based / verifiable rewards)
    hf        reward/hf.py        a Hugging Face sequence-classification model run with transformers
    megatron  reward/megatron.py  a Megatron reward model, tensor/pipeline parallel like the policy
    remote    reward/remote.py    a reward model served by `python -m optune_nemo.serve_rm`
"""

from __future__ import annotations

from pathlib import Path

from optune_nemo.config import RewardConfig
from optune_nemo.errors import ConfigError
from optune_nemo.reward.base import REWARD_TYPES, RewardError, RewardUnavailable, ShardedReward


def check(cfg: RewardConfig) -> None:
    """The family's check of the `reward` section: `reward.type` is a registered type, and the key that
    type reads is set (rule: reward.function; hf, megatron: reward.path; remote: reward.url). ConfigError
    naming the key."""
    REWARD_TYPES.check(cfg.type)
    if cfg.type == "rule" and not (hasattr(cfg.function, "get") and cfg.function.get("_target_")):
        raise ConfigError("reward.function: must be a node with a `_target_` naming a callable")
    if cfg.type in ("hf", "megatron") and not (cfg.path and Path(cfg.path).expanduser().is_dir()):
        raise ConfigError(f"reward.path: reward.type={cfg.type} needs an existing reward model directory "
                          f"(got {cfg.path!r})")
    if cfg.type == "remote" and not (cfg.url and cfg.url.startswith(("http://", "grpc://"))):
        raise ConfigError(f"reward.url: reward.type=remote needs the server's URL, http://host:port or "
                          f"grpc://host:port (got {cfg.url!r})")


def build_reward(cfg: RewardConfig, *, dist=None) -> ShardedReward:
    """The reward `reward.type` names, sharded over `dist`'s data-parallel ranks."""
    return REWARD_TYPES.get(cfg.type)(cfg, dist=dist)


__all__ = ["REWARD_TYPES", "RewardError", "RewardUnavailable", "ShardedReward", "build_reward", "check"]
