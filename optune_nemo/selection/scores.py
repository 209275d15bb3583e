"""The strategies as plain functions of ranking scores and prompt ids, for callers that have scores rather
than a rollout store (the report's Fig. 2 analysis, tests). Not a strategy: it registers nothing."""

from __future__ import annotations

from collections.abc import Sequence

from optune_nemo.selection import StoreView
from optune_nemo.selection import select_prompts as _select
from optune_nemo.selection.lowest_reward import lowest_reward
from optune_nemo.selection.uniform import uniform


def _view(scores: Sequence[float], prompt_ids: Sequence[int]) -> StoreView:
    """A view whose ranking scores are `scores` (both rewards equal to the score; age unknown)."""
    if len(scores) != len(prompt_ids):
        raise ValueError("scores and prompt_ids must have the same length")
    return StoreView(tuple(prompt_ids), tuple(scores), tuple(scores), tuple(-1 for _ in prompt_ids))


def select_lowest(scores: Sequence[float], prompt_ids: Sequence[int], k: int) -> list[int]:
    """The k prompts with the lowest scores; equal scores are broken by the smaller prompt id."""
    return sorted(lowest_reward(_view(scores, prompt_ids), k, seed=0, iteration=0))


def select_random(prompt_ids: Sequence[int], k: int, *, seed: int, iteration: int) -> list[int]:
    """k prompts drawn uniformly without replacement, seeded by (seed, iteration) only."""
    return sorted(uniform(_view([0.0] * len(prompt_ids), prompt_ids), k, seed=seed, iteration=iteration))


def select_prompts(strategy: str, scores: Sequence[float], prompt_ids: Sequence[int], *, rho: float,
                   seed: int, iteration: int) -> list[int]:
    """Prompt ids to regenerate at `iteration` (sorted). K = ceil(rho * N)."""
    return _select(strategy, _view(scores, prompt_ids), rho=rho, seed=seed, iteration=iteration)
