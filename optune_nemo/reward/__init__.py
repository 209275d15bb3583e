"""Rewards behind one protocol (`interfaces.Reward`), chosen by `reward.type`: each type is one module
of this package with a `build(cfg: RewardConfig, *, dist) -> Reward` function.

    rule      reward/base.py      a Python function (rule-based / verifiable rewards)
    hf        reward/hf.py        a Hugging Face sequence-classification model run with transformers
    megatron  reward/megatron.py  a Megatron reward model, tensor/pipeline parallel like the policy
    remote    reward/remote.py    a reward model served by `python -m optune_nemo.serve_rm`
"""

from __future__ import annotations

import importlib

from optune_nemo.config import RewardConfig
from optune_nemo.reward.base import RewardError, RewardUnavailable, ShardedReward

_MODULES = {"rule": "base", "hf": "hf", "megatron": "megatron", "remote": "remote"}


def build_reward(cfg: RewardConfig, *, dist=None) -> ShardedReward:
    """The reward `reward.type` names, sharded over `dist`'s data-parallel ranks."""
    return importlib.import_module(f"optune_nemo.reward.{_MODULES[cfg.type]}").build(cfg, dist=dist)


__all__ = ["RewardError", "RewardUnavailable", "ShardedReward", "build_reward"]
