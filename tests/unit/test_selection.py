"""Prompt selection (docs/algorithm.md, step 1) and K = ceil(rho * N)."""

import math
from fractions import Fraction

import pytest

from optune_nemo.config import num_regenerated
from optune_nemo.selection import StoreView
from optune_nemo.selection.scores import (
    select_lowest,
    select_prompts,
    select_random,
)


def _exact_k(rho: float, n: int) -> int:
    # ceil of the decimal value of rho (as written) times n, exact rational arithmetic
    return math.ceil(Fraction(repr(rho)) * n)


# --------------------------------------------------------------------------- K = ceil(rho * N)

@pytest.mark.parametrize("rho,n,k", [
    (0.3, 10, 3), (0.7, 10, 7), (0.5, 10, 5), (0.1, 10, 1), (0.2, 10, 2), (0.6, 10, 6),
    (0.9, 10, 9), (0.25, 4, 1), (0.5, 3, 2), (0.7, 3, 3), (0.34, 3, 2), (1e-9, 10, 1),
    (1e-9, 1, 1), (1.0, 10, 10), (1.0, 1, 1), (0.5, 48000, 24000), (0.7, 48000, 33600),
])
def test_num_regenerated_table(rho, n, k):
    assert num_regenerated(rho, n) == k


def test_float_noise_products_are_not_rounded_up():
    # binary floats: these products land just above the integer, a bare ceil would add one
    assert 0.28 * 25 > 7 and 0.07 * 100 > 7 and 0.56 * 75 > 42
    assert num_regenerated(0.28, 25) == 7
    assert num_regenerated(0.07, 100) == 7
    assert num_regenerated(0.56, 75) == 42
    assert num_regenerated(0.1 + 0.2, 10) == 3  # 0.30000000000000004 * 10


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 13, 25, 50, 64, 75, 100, 333, 1000])
def test_num_regenerated_matches_exact_decimal_ceil(n):
    for pct in range(1, 101):
        rho = pct / 100
        assert num_regenerated(rho, n) == _exact_k(rho, n), (rho, n)


def test_num_regenerated_bounds():
    for n in (1, 5, 17):
        assert num_regenerated(1e-9, n) == 1
        assert num_regenerated(1.0, n) == n


# --------------------------------------------------------------------------- ranking scores

def test_ranking_scores_is_max_of_pair():
    view = StoreView((0, 1, 2), (0.1, -1.0, 2.0), (0.3, -2.0, 2.0), (0, 0, 0))
    assert view.scores == [0.3, -1.0, 2.0]


# --------------------------------------------------------------------------- lowest_reward

def test_select_lowest_picks_k_lowest():
    ids = [10, 11, 12, 13, 14, 15]
    scores = [0.9, -0.5, 0.2, 0.8, -1.0, 0.1]
    assert select_lowest(scores, ids, 3) == [11, 14, 15]
    assert select_lowest(scores, ids, 1) == [14]
    assert select_lowest(scores, ids, 6) == sorted(ids)


def test_select_lowest_ties_broken_by_smaller_prompt_id():
    # unsorted ids: the tie at 0.0 among ids 7, 3, 5 -> smallest ids win
    ids = [7, 3, 9, 5, 1]
    scores = [0.0, 0.0, 1.0, 0.0, -1.0]
    assert select_lowest(scores, ids, 2) == [1, 3]
    assert select_lowest(scores, ids, 3) == [1, 3, 5]
    assert select_lowest(scores, ids, 4) == [1, 3, 5, 7]


def test_select_lowest_independent_of_input_order():
    ids = list(range(20))
    scores = [((i * 7) % 5) / 4 for i in ids]  # many ties
    want = select_lowest(scores, ids, 8)
    rev = select_lowest(scores[::-1], ids[::-1], 8)
    assert want == rev
    # independent check: sort by (score, id)
    assert want == sorted(sorted(ids, key=lambda i: (scores[i], i))[:8])


def test_select_prompts_lowest_uses_ceil_k():
    ids = list(range(100, 110))
    scores = [float(s) for s in (5, 3, 9, 1, 7, 0, 8, 2, 6, 4)]
    got = select_prompts("lowest_reward", scores, ids, rho=0.3, seed=0, iteration=1)
    assert got == [103, 105, 107]  # scores 1, 0, 2
    got = select_prompts("lowest_reward", scores, ids, rho=0.7, seed=0, iteration=1)
    assert len(got) == 7
    assert got == sorted(ids[i] for i in sorted(range(10), key=lambda i: scores[i])[:7])


# --------------------------------------------------------------------------- random

def test_select_random_reproducible_and_varies():
    ids = list(range(50))
    a = select_random(ids, 10, seed=3, iteration=1)
    assert a == select_random(ids, 10, seed=3, iteration=1)
    assert len(a) == 10 and len(set(a)) == 10 and set(a) <= set(ids)
    assert a == sorted(a)
    other_iters = [select_random(ids, 10, seed=3, iteration=t) for t in range(2, 6)]
    assert any(o != a for o in other_iters)
    assert all(o != a for o in other_iters[:2])
    other_seeds = [select_random(ids, 10, seed=s, iteration=1) for s in range(4, 8)]
    assert all(o != a for o in other_seeds)


def test_select_random_independent_of_id_order():
    ids = list(range(30))
    assert select_random(ids, 7, seed=1, iteration=2) == select_random(ids[::-1], 7, seed=1, iteration=2)


def test_select_prompts_random_independent_of_scores():
    ids = list(range(40))
    s1 = [float(i) for i in ids]
    s2 = [-float(i) for i in ids]
    a = select_prompts("random", s1, ids, rho=0.25, seed=5, iteration=2)
    b = select_prompts("random", s2, ids, rho=0.25, seed=5, iteration=2)
    assert a == b and len(a) == 10
    assert a != select_prompts("random", s1, ids, rho=0.25, seed=5, iteration=3)
    assert a != select_prompts("random", s1, ids, rho=0.25, seed=6, iteration=2)


def test_select_random_roughly_uniform():
    ids = list(range(10))
    counts = dict.fromkeys(ids, 0)
    trials = 400
    for t in range(trials):
        for i in select_random(ids, 3, seed=11, iteration=t):
            counts[i] += 1
    # expected 120 per id (400 * 3 / 10); binomial sd ~ 9.2, allow a wide margin
    assert all(70 < c < 170 for c in counts.values()), counts


# --------------------------------------------------------------------------- all and errors

def test_select_all_returns_everything():
    ids = [5, 2, 9, 1]
    scores = [0.0, 1.0, 2.0, 3.0]
    for rho in (0.1, 0.5, 1.0):
        assert select_prompts("all", scores, ids, rho=rho, seed=0, iteration=1) == [1, 2, 5, 9]


@pytest.mark.parametrize("strategy", ["lowest_reward", "random"])
def test_rho_edges(strategy):
    ids = list(range(12))
    scores = [float(i % 4) for i in ids]
    assert len(select_prompts(strategy, scores, ids, rho=1e-9, seed=0, iteration=1)) == 1
    assert select_prompts(strategy, scores, ids, rho=1.0, seed=0, iteration=1) == ids


def test_bad_strategy_raises():
    with pytest.raises(ValueError, match="optune.selection"):
        select_prompts("highest", [0.0], [0], rho=0.5, seed=0, iteration=1)


@pytest.mark.parametrize("rho", [0.0, -0.1, 1.0000001, 2.0, float("nan")])
@pytest.mark.parametrize("strategy", ["lowest_reward", "random", "all"])
def test_rho_out_of_range_raises(strategy, rho):
    with pytest.raises(ValueError, match="optune.rho"):
        select_prompts(strategy, [0.0, 1.0], [0, 1], rho=rho, seed=0, iteration=1)


def test_length_mismatch_raises():
    with pytest.raises(ValueError):
        select_prompts("lowest_reward", [0.0], [0, 1], rho=0.5, seed=0, iteration=1)
