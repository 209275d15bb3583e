"""The selection strategies behind `optune.selection` (optune_nemo/selection/), each against its choice rule
restated independently, the registry (names, module:function, one-line errors), and the view of a store."""

import pytest

from optune_nemo.errors import ConfigError
from optune_nemo.selection import STRATEGIES, StoreView, check_selection, select_prompts, view_of


def _view(rows):
    """rows: (prompt_id, reward_a, reward_b, generated_at)."""
    rows = sorted(rows)
    return StoreView(*(tuple(r[i] for r in rows) for i in range(4)))


VIEW = _view([(0, 0.5, 0.5, 0), (1, 0.9, 0.1, 2), (2, 0.2, 0.3, 1), (3, 0.7, 0.7, 2),
              (4, 0.4, 0.0, 0), (5, 1.0, 0.95, 1), (6, 0.8, 0.4, 3), (7, -0.2, 0.3, 1)])


def test_registered_names():
    assert set(STRATEGIES.names()) >= {"lowest_reward", "random", "all", "smallest_gap", "oldest"}


def test_smallest_gap_takes_ties_then_the_smallest_gaps():
    # gaps: 0:0.0 1:0.8 2:0.1 3:0.0 4:0.4 5:0.05 6:0.4 7:0.5; ties 0 and 3 first (lower score 0.5 < 0.7)
    assert select_prompts("smallest_gap", VIEW, rho=0.25, seed=0, iteration=1) == [0, 3]
    assert select_prompts("smallest_gap", VIEW, rho=0.5, seed=0, iteration=1) == [0, 2, 3, 5]
    # equal gaps 0.4 (prompts 4 and 6): the lower ranking score first (0.4 < 0.8)
    assert select_prompts("smallest_gap", VIEW, rho=5 / 8, seed=0, iteration=1) == [0, 2, 3, 4, 5]


def test_oldest_takes_the_earliest_generated_first():
    # ages: iteration 0: prompts 0, 4; iteration 1: 2, 5, 7; ties by the lower score (4: 0.4 < 0: 0.5)
    assert select_prompts("oldest", VIEW, rho=0.125, seed=0, iteration=4) == [4]
    assert select_prompts("oldest", VIEW, rho=0.25, seed=0, iteration=4) == [0, 4]
    # iteration 1: scores 2:0.3 5:1.0 7:0.3 -> 2 then 7 (equal scores: the smaller id), then 5
    assert select_prompts("oldest", VIEW, rho=0.5, seed=0, iteration=4) == [0, 2, 4, 7]


def test_lowest_reward_and_all_and_random():
    # scores: 0:0.5 1:0.9 2:0.3 3:0.7 4:0.4 5:1.0 6:0.8 7:0.3
    assert select_prompts("lowest_reward", VIEW, rho=0.375, seed=0, iteration=1) == [2, 4, 7]
    assert select_prompts("all", VIEW, rho=1.0, seed=0, iteration=1) == list(range(8))
    r = select_prompts("random", VIEW, rho=0.5, seed=3, iteration=2)
    assert len(r) == 4 and r == select_prompts("random", VIEW, rho=0.5, seed=3, iteration=2)


def picks_the_highest(view, k, *, seed, iteration):
    """A strategy kept outside the package (named by module:function)."""
    return sorted(view.prompt_ids, key=lambda pid: -max(view.reward_a[pid], view.reward_b[pid]))[:k]


def test_module_function_is_found_and_checked():
    name = f"{__name__}:picks_the_highest"
    assert select_prompts(name, VIEW, rho=0.25, seed=0, iteration=1) == [1, 5]
    with pytest.raises(ConfigError, match="optune.selection: cannot import"):
        check_selection("no_such_module:fn", 0.5)


def test_unknown_name_and_all_with_rho_below_one():
    with pytest.raises(ConfigError, match=r"optune.selection: must be one of .*lowest_reward.*oldest"):
        check_selection("highest", 0.5)
    with pytest.raises(ConfigError, match="optune.rho: selection=all"):
        check_selection("all", 0.5)
    check_selection("smallest_gap", 0.5)


def returns_a_foreign_id(view, k, *, seed, iteration):
    return [99]


def test_a_strategy_returning_foreign_ids_is_refused():
    # named by import path, so that the registry keeps exactly its own strategies (tests/unit/test_registry.py)
    with pytest.raises(ValueError, match="not distinct prompts"):
        select_prompts(f"{__name__}:returns_a_foreign_id", VIEW, rho=0.1, seed=0, iteration=1)


def test_view_of_a_store_keeps_prompts_with_a_pair():
    from optune_nemo.algorithm.store import RolloutStore
    from optune_nemo.interfaces import Prompt, Sample

    store = RolloutStore([Prompt(i, f"p{i}", (1, 2)) for i in range(3)])
    store.set_pair(2, Sample([1], "a", "stop"), Sample([2], "b", "stop"), 0.1, 0.7, iteration=4)
    store.set_pair(0, Sample([1], "a", "stop"), Sample([2], "b", "stop"), 0.5, 0.2, iteration=1)
    view = view_of(store)
    assert view == StoreView((0, 2), (0.5, 0.1), (0.2, 0.7), (1, 4))
    assert view.scores == [0.5, 0.7] and view.gaps == pytest.approx([0.3, 0.6])
