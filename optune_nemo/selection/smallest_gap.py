"""Regenerate first the pairs that carry the least preference signal."""

from optune_nemo.selection.base import STRATEGIES, StoreView, ordered_first


@STRATEGIES.register("smallest_gap")
def smallest_gap(view: StoreView, k: int, *, seed: int, iteration: int) -> list[int]:
    """The k smallest reward gaps |r_a - r_b| (ties, gap 0, first); equal gaps: the lower ranking score
    first, then the smaller prompt id."""
    keys = [(g, s, pid) for g, s, pid in zip(view.gaps, view.scores, view.prompt_ids)]
    return ordered_first(view, keys, k)
