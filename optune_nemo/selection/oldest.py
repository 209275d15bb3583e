"""Regenerate first the pairs generated longest ago (bounded staleness)."""

from optune_nemo.selection.base import STRATEGIES, StoreView, ordered_first


@STRATEGIES.register("oldest")
def oldest(view: StoreView, k: int, *, seed: int, iteration: int) -> list[int]:
    """The k pairs with the smallest generating iteration; equal ages: the lower ranking score first, then
    the smaller prompt id."""
    keys = [(g, s, pid) for g, s, pid in zip(view.generated_at, view.scores, view.prompt_ids)]
    return ordered_first(view, keys, k)
