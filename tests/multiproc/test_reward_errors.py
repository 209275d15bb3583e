"""A reward failing on one rank stops every rank with the same message (no rank is left waiting in a
collective), whatever the exception; the kind decides the exit path (ConfigError: the user's function;
RewardUnavailable: a service; anything else: RewardError)."""

import pytest
from dist_utils import run_ranks

pytestmark = pytest.mark.multiproc


def _score_with_failure_on_rank1(rank, kind):
    from optune_nemo.config import ConfigError
    from optune_nemo.interfaces import Prompt
    from optune_nemo.reward.base import RewardError, RewardUnavailable, RuleReward
    from optune_nemo.runtime.distributed import DistEnv, init_process_group, local_device

    device = local_device()
    r, world, _ = init_process_group(device)
    dist = DistEnv(rank=r, world_size=world, local_rank=r, tp_size=1, pp_size=1, dp_size=world, tp_rank=0,
                   pp_rank=0, dp_rank=r, tp_group=None, pp_group=None, dp_group=None, device=device)
    errors = {"runtime": RuntimeError("connection reset by peer"), "oom": MemoryError("out of memory"),
              "unavailable": RewardUnavailable("reward.url: http://x: no answer"), "none": None}

    def fn(prompts, responses, metadata):
        if rank == 1 and errors[kind] is not None:
            raise errors[kind]
        return [float(len(x)) for x in responses]

    reward = RuleReward(fn, name="flaky", batch_size=2, dist=dist)
    prompts = [Prompt(i, f"p{i}", (i,)) for i in range(5)]
    try:
        return "ok", reward.score(prompts, ["a", "bb", "ccc", "dddd", "eeeee"])
    except (ConfigError, RewardUnavailable, RewardError) as e:
        return type(e).__name__, str(e)


def test_success_gathers_every_rank():
    a, b = run_ranks(_score_with_failure_on_rank1, 2, "none")
    assert a == b == ("ok", [1.0, 2.0, 3.0, 4.0, 5.0])


@pytest.mark.parametrize("kind,expected", [
    ("runtime", ("ConfigError", "reward.function: flaky raised RuntimeError: connection reset by peer")),
    ("oom", ("ConfigError", "reward.function: flaky raised MemoryError: out of memory")),
    ("unavailable", ("RewardUnavailable", "reward.url: http://x: no answer")),
])
def test_an_exception_on_one_rank_stops_both_with_the_same_message(kind, expected):
    a, b = run_ranks(_score_with_failure_on_rank1, 2, kind, timeout=120)
    assert a == b == expected
