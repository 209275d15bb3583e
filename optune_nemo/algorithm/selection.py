"""Choosing which prompts to regenerate (SPEC.md step 1): pure functions of scores and ids."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from optune_nemo.config import num_regenerated
from optune_nemo.seeding import generator

STRATEGIES = ("lowest_reward", "random", "all")


def ranking_scores(reward_a: Sequence[float], reward_b: Sequence[float]) -> list[float]:
    """A prompt's ranking score: the reward of its chosen response, max(r_a, r_b)."""
    return [max(a, b) for a, b in zip(reward_a, reward_b)]


def select_lowest(scores: Sequence[float], prompt_ids: Sequence[int], k: int) -> list[int]:
    """The k prompts with the lowest scores; equal scores are broken by the smaller prompt id."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], prompt_ids[i]))
    return sorted(prompt_ids[i] for i in order[:k])


def select_random(prompt_ids: Sequence[int], k: int, *, seed: int, iteration: int) -> list[int]:
    """k prompts drawn uniformly without replacement, seeded by (seed, iteration) only."""
    gen = generator(seed, "select", iteration)
    ids = sorted(prompt_ids)
    return sorted(ids[i] for i in torch.randperm(len(ids), generator=gen)[:k].tolist())


def select_prompts(strategy: str, scores: Sequence[float], prompt_ids: Sequence[int], *, rho: float,
                   seed: int, iteration: int) -> list[int]:
    """Prompt ids to regenerate at `iteration` (sorted). K = ceil(rho * N)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"optune.selection: must be one of {', '.join(STRATEGIES)} (got {strategy!r})")
    if not 0 < rho <= 1:
        raise ValueError(f"optune.rho: must be in (0, 1] (got {rho!r})")
    if len(scores) != len(prompt_ids):
        raise ValueError("scores and prompt_ids must have the same length")
    if strategy == "all":
        return sorted(prompt_ids)
    k = num_regenerated(rho, len(prompt_ids))
    if strategy == "lowest_reward":
        return select_lowest(scores, prompt_ids, k)
    return select_random(prompt_ids, k, seed=seed, iteration=iteration)
