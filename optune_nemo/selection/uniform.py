"""The paper's baseline: K prompts uniformly at random (registered as `random`)."""

import torch

from optune_nemo.runtime.seeding import generator
from optune_nemo.selection.base import STRATEGIES, StoreView


@STRATEGIES.register("random")
def uniform(view: StoreView, k: int, *, seed: int, iteration: int) -> list[int]:
    """k prompts drawn without replacement, seeded by (seed, iteration) only."""
    ids = sorted(view.prompt_ids)
    gen = generator(seed, "select", iteration)
    return [ids[i] for i in torch.randperm(len(ids), generator=gen)[:k].tolist()]
