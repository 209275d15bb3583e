"""The selection protocol, its registry and the call the loop makes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from optune_nemo.config import OptuneConfig, num_regenerated
from optune_nemo.errors import ConfigError
from optune_nemo.registry import Registry


@dataclass(frozen=True)
class StoreView:
    """What a strategy may look at: per prompt (ids ascending) its stored pair's rewards and the iteration
    that generated it."""

    prompt_ids: tuple[int, ...]
    reward_a: tuple[float, ...]
    reward_b: tuple[float, ...]
    generated_at: tuple[int, ...]

    @property
    def scores(self) -> list[float]:
        """The ranking score of each prompt: the reward of its chosen response, max(r_a, r_b)."""
        return [max(a, b) for a, b in zip(self.reward_a, self.reward_b)]

    @property
    def gaps(self) -> list[float]:
        return [abs(a - b) for a, b in zip(self.reward_a, self.reward_b)]


class Strategy(Protocol):
    def __call__(self, view: StoreView, k: int, *, seed: int, iteration: int) -> list[int]:
        ...


STRATEGIES: Registry[Strategy] = Registry("optune.selection", "optune_nemo.selection", outside="module:attribute")


def view_of(store) -> StoreView:
    """The view of a RolloutStore: every prompt that has a pair."""
    ids = [pid for pid in store.prompt_ids() if store.pair(pid).has_pair]
    recs = [store.pair(pid) for pid in ids]
    return StoreView(tuple(ids), tuple(r.reward_a for r in recs), tuple(r.reward_b for r in recs),
                     tuple(r.generated_at_iteration for r in recs))


def check_selection(name: str, rho: float) -> None:
    """ConfigError naming optune.selection / optune.rho when the pair cannot run (a `module:attribute`
    strategy is imported here, so a typo stops the run before any work)."""
    STRATEGIES.get(name)
    if name == "all" and rho != 1:
        raise ConfigError(f"optune.rho: selection=all regenerates every prompt, set rho=1 (got {rho})")


def check(optune: OptuneConfig) -> None:
    """The family's check of the `optune` section: `check_selection` of its selection and rho."""
    check_selection(optune.selection, optune.rho)


def select_prompts(strategy: str, view: StoreView, *, rho: float, seed: int, iteration: int) -> list[int]:
    """Prompt ids to regenerate at `iteration` (sorted): K = ceil(rho * N) by the named strategy."""
    if not 0 < rho <= 1:
        raise ValueError(f"optune.rho: must be in (0, 1] (got {rho!r})")
    k = num_regenerated(rho, len(view.prompt_ids))
    chosen = STRATEGIES.get(strategy)(view, k, seed=seed, iteration=iteration)
    if len(set(chosen)) != len(chosen) or not set(chosen) <= set(view.prompt_ids):
        raise ValueError(f"optune.selection={strategy} returned ids that are not distinct prompts of the store")
    return sorted(chosen)


def ordered_first(view: StoreView, keys: Sequence, k: int) -> list[int]:
    """The k prompts that come first when sorted by `keys` (one sortable key per prompt, in view order)."""
    order = sorted(range(len(view.prompt_ids)), key=lambda i: keys[i])
    return [view.prompt_ids[i] for i in order[:k]]
