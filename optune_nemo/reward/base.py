"""The reward interface: score (prompt, response) batches with any callable.

A reward function is `fn(prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]`
(`types.RewardFn`), chosen in the config with a Hydra `_target_` (its keyword arguments go in the
same node), so a user points `reward.function._target_` at their own function.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from optune_nemo.config import ConfigError, RewardConfig
from optune_nemo.types import Prompt, RewardFn


class RewardModel:
    def __init__(self, fn: RewardFn, *, batch_size: int, name: str = ""):
        self.fn, self.batch_size, self.name = fn, batch_size, name or getattr(fn, "__name__", repr(fn))
        self.calls = 0
        self.scored = 0

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        """One float per (prompt, response), in order. Non-finite rewards are an error."""
        out: list[float] = []
        for k in range(0, len(prompts), self.batch_size):
            ps, rs = prompts[k:k + self.batch_size], list(responses[k:k + self.batch_size])
            got = list(self.fn([p.text for p in ps], rs, [p.metadata for p in ps]))
            self.calls += 1
            if len(got) != len(ps):
                raise ValueError(f"reward function {self.name} returned {len(got)} rewards for "
                                 f"{len(ps)} responses")
            for p, r in zip(ps, got):
                try:
                    value = float(r)     # python, numpy and 0-d torch numbers alike
                except (TypeError, ValueError):
                    raise ValueError(f"reward function {self.name} returned {r!r} (not a number) "
                                     f"for prompt id {p.prompt_id}") from None
                if not math.isfinite(value):
                    raise ValueError(f"reward function {self.name} returned a non-finite reward "
                                     f"{r!r} for prompt id {p.prompt_id}")
                out.append(value)
        self.scored += len(out)
        return out


def build_reward(cfg: RewardConfig) -> RewardModel:
    """Instantiate `reward.function` (Hydra `_target_`, partially applied with its kwargs)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    node = dict(cfg.function)
    target = node.get("_target_")
    try:
        fn = instantiate(node, _partial_=True)
    except InstantiationException as e:
        raise ConfigError(f"reward.function._target_: cannot import or call {target!r}: "
                          f"{str(e).splitlines()[0]}") from None
    if not callable(fn):
        raise ConfigError(f"reward.function._target_: {target!r} is not callable")
    return RewardModel(fn, batch_size=cfg.batch_size, name=target)


class ShardedReward:
    """Scores a batch spread over every rank (response i on rank i % world), then all-gathers, so a
    model-based reward uses all devices. The result does not depend on the world size. An error on
    any rank is raised on every rank (a rank failing alone would leave the others in a collective)."""

    def __init__(self, reward: RewardModel, *, rank: int, world_size: int):
        self.reward, self.rank, self.world_size = reward, rank, world_size

    def __getattr__(self, name):
        return getattr(self.reward, name)

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        from optune_nemo.distributed import all_gather_object

        mine = list(range(self.rank, len(prompts), self.world_size))
        try:
            part: object = self.reward.score([prompts[i] for i in mine], [responses[i] for i in mine])
        except ValueError as e:
            part = e
        parts = all_gather_object(part)
        for p in parts:
            if isinstance(p, Exception):
                raise ValueError(str(p))
        out = [0.0] * len(prompts)
        for rank, values in enumerate(parts):
            for i, v in zip(range(rank, len(prompts), self.world_size), values):
                out[i] = v
        return out
