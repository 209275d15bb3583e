"""Which prompts to regenerate at iteration t >= 1 (Algorithm 1, step 1): one module per strategy, each a
pure function of the rollout store's view, found by `optune.selection` (a registered name or
`module:function`).

    lowest_reward   the paper: the K prompts whose chosen response has the lowest reward
    random          K prompts uniformly at random (the paper's baseline)
    all             every prompt (online DPO; rho must be 1)
    smallest_gap    first the pairs that carry the least preference signal: ties, then the smallest reward
                    gap |r_a - r_b| (the idea behind dropping uninformative groups in dynamic sampling)
    oldest          first the pairs generated longest ago (bounded staleness)

K = ceil(rho * N). Iteration 0 regenerates every prompt whatever the strategy (the loop does that).
A strategy is `fn(view: StoreView, k: int, *, seed: int, iteration: int) -> list[int]` returning k prompt
ids; ties in its order are broken by documented rules so the choice is deterministic.
"""

from optune_nemo.selection.base import (
    STRATEGIES,
    StoreView,
    check,
    check_selection,
    num_regenerated,
    select_prompts,
    view_of,
)

__all__ = ["STRATEGIES", "StoreView", "check", "check_selection", "num_regenerated", "select_prompts", "view_of"]
