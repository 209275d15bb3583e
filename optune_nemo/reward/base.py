"""The reward protocol's common part, and the rule-based reward.

Every reward type (`reward.type`) subclasses `ShardedReward` and implements `score_batch` for one batch
of (prompt, response) pairs; the base class deals a scoring call over data-parallel ranks (pair i to
DP rank i % dp), calls `score_batch` in batches of `reward.batch_size`, checks what comes back (one
finite number per response), and gathers the result to every rank. Ranks of one data-parallel group
(the tensor / pipeline ranks of a model-parallel reward model) score the same shard together.

Failures stop every rank with the same message: the outcome of each rank (its scores or its error) is
all-gathered over the whole world before anything else happens, so a rank that fails alone (a network
error, an out-of-memory) never leaves the others waiting in a collective. What kind of error it is
decides what the run does with it:
  - `ConfigError` (the user's function or files misbehave: a wrong count, NaN, an exception): exit 2;
  - `RewardUnavailable` (a reward server cannot be reached or answer): exit 1, every generated and
    scored chunk stays on disk and a rerun scores only what is missing;
  - anything else: re-raised on every rank as `RewardError` with the failing rank's message.
"""

from __future__ import annotations

import inspect
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

from optune_nemo.config import ConfigError, RewardConfig
from optune_nemo.errors import RewardError, RewardUnavailable  # noqa: F401  (re-exported: the reward types raise them)
from optune_nemo.interfaces import Prompt
from optune_nemo.registry import Registry
from optune_nemo.runtime.distributed import DistEnv, all_gather_object, shard

log = logging.getLogger(__name__)

REWARD_TYPES = Registry("reward.type", "optune_nemo.reward", sort=False)
"""`reward.type` -> `build(cfg: RewardConfig, *, dist) -> ShardedReward`, registered by the type's module."""




_KINDS = {"config": ConfigError, "unavailable": RewardUnavailable, "error": RewardError}


def _kind(e: BaseException) -> str:
    if isinstance(e, ConfigError):
        return "config"
    if isinstance(e, RewardUnavailable):
        return "unavailable"
    return "error"


class ShardedReward(ABC):
    """`interfaces.Reward` with data-parallel sharding, batching, checks and all-rank error propagation."""

    key = "reward"
    """The config key named in messages about this reward."""

    def __init__(self, *, name: str, batch_size: int, dist: DistEnv | None = None):
        self.name, self.batch_size, self.dist = name, batch_size, dist
        self.calls = 0       # score_batch calls on this rank
        self.scored = 0      # responses scored on this rank

    def prepare(self) -> None:  # noqa: B027 (a hook: rule-based rewards take nothing)
        """Before a scoring phase; nothing to take by default."""

    def release(self) -> None:  # noqa: B027 (a hook: rule-based rewards give nothing back)
        """After a scoring phase; nothing to give back by default."""

    @abstractmethod
    def score_batch(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> Sequence[float]:
        """Rewards of one batch (at most `batch_size` pairs) on this rank."""

    # ------------------------------------------------------------------ the protocol

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        """One finite float per (prompt, response), in order, on every rank."""
        d = self.dist
        dp_rank, dp_size = (d.dp_rank, d.dp_size) if d is not None else (0, 1)
        mine = shard(len(prompts), dp_rank, dp_size)
        try:
            outcome = ("ok", self._score_local([prompts[i] for i in mine], [responses[i] for i in mine]))
        except Exception as e:   # every kind: the other ranks must hear of it (see the module docstring)
            outcome = (_kind(e), str(e) or type(e).__name__)
        if d is None or d.world_size == 1:
            parts = [(0, outcome)]
        else:
            parts = all_gather_object((dp_rank, outcome))
        for _, (status, value) in parts:
            if status != "ok":
                raise _KINDS[status](value)
        by_dp = {}
        for rank_dp, (_, values) in parts:
            by_dp.setdefault(rank_dp, values)    # the ranks of one DP group computed the same shard
        out: list[float] = [0.0] * len(prompts)
        for rank_dp, values in by_dp.items():
            for i, v in zip(shard(len(prompts), rank_dp, dp_size), values):
                out[i] = v
        return out

    def _score_local(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        out: list[float] = []
        for k in range(0, len(prompts), self.batch_size):
            ps, rs = prompts[k:k + self.batch_size], list(responses[k:k + self.batch_size])
            got = list(self.score_batch(ps, rs))
            self.calls += 1
            out += self._checked(got, ps)
        self.scored += len(out)
        return out

    def _checked(self, got: list, prompts: Sequence[Prompt]) -> list[float]:
        if len(got) != len(prompts):
            raise ConfigError(f"{self.key}: {self.name} returned {len(got)} rewards for {len(prompts)} responses")
        out = []
        for p, r in zip(prompts, got):
            try:
                value = float(r)     # python, numpy and 0-d torch numbers alike
            except (TypeError, ValueError):
                raise ConfigError(f"{self.key}: {self.name} returned {r!r} (not a number) for prompt id "
                                  f"{p.prompt_id}") from None
            if not math.isfinite(value):
                raise ConfigError(f"{self.key}: {self.name} returned a non-finite reward {r!r} for prompt id "
                                  f"{p.prompt_id}")
            out.append(value)
        return out


def takes_messages(fn) -> bool:
    """Whether `fn` has a parameter named `messages` that can be passed by keyword (a `**kwargs` catch-all
    does not count: such a function may hand its keywords on to something that does not expect them)."""
    try:
        param = inspect.signature(fn).parameters.get("messages")
    except (TypeError, ValueError):    # a callable without an inspectable signature: the plain call
        return False
    return param is not None and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)


class RuleReward(ShardedReward):
    """`reward.type=rule`: a Python function `fn(prompts, responses, metadata) -> list[float]`
    (`interfaces.RewardFn`) named by `reward.function._target_`, its keyword arguments in the same node;
    a function with a `messages` parameter also gets `messages=[prompt.conversation() per response]` (the
    whole conversation; `prompts` stays each prompt's last user turn). An exception from it is the user's
    to fix (ConfigError, exit 2), except `RewardUnavailable`, which a function that calls a service raises
    to stop the run with everything kept for a rerun."""

    key = "reward.function"

    def __init__(self, fn, *, name: str, batch_size: int, dist: DistEnv | None = None):
        super().__init__(name=name, batch_size=batch_size, dist=dist)
        self.fn = fn
        self.takes_messages = takes_messages(fn)

    def score_batch(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> Sequence[float]:
        extra = {"messages": [p.conversation() for p in prompts]} if self.takes_messages else {}
        try:
            return self.fn([p.text for p in prompts], list(responses), [p.metadata for p in prompts], **extra)
        except RewardUnavailable:   # a function calling a service may say so: the run then keeps its state
            raise
        except Exception as e:   # the user's function: its failure is the user's to fix
            raise ConfigError(f"{self.key}: {self.name} raised {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None


def rule_function(cfg: RewardConfig):
    """(callable, its import path) of `reward.function` (Hydra `_target_`, partially applied with its kwargs)."""
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
    return fn, target


@REWARD_TYPES.register("rule")
def build(cfg: RewardConfig, *, dist: DistEnv | None = None) -> RuleReward:
    """`reward.type=rule`."""
    fn, target = rule_function(cfg)
    return RuleReward(fn, name=target, batch_size=cfg.batch_size, dist=dist)
