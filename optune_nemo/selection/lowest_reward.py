"""The paper's strategy: regenerate the prompts whose best stored response has the lowest reward."""

from optune_nemo.selection.base import STRATEGIES, StoreView, ordered_first


@STRATEGIES.register("lowest_reward")
def lowest_reward(view: StoreView, k: int, *, seed: int, iteration: int) -> list[int]:
    """The k lowest ranking scores max(r_a, r_b); equal scores: the smaller prompt id first."""
    return ordered_first(view, [(s, pid) for s, pid in zip(view.scores, view.prompt_ids)], k)
