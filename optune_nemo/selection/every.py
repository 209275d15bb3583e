"""Online DPO: every prompt, every iteration (registered as `all`; rho must be 1)."""

from optune_nemo.selection.base import STRATEGIES, StoreView


@STRATEGIES.register("all")
def every(view: StoreView, k: int, *, seed: int, iteration: int) -> list[int]:
    return list(view.prompt_ids)
