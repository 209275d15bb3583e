"""optune_nemo.stats against independent computations on synthetic experiments whose truth is known: an
equal pair comes out equivalent, a shifted one better / worse, a noisy one undecided; the intervals cover
the truth at about their level; the sign test, interpolation and area match hand-computed values."""

import math

import numpy as np
import pytest

from optune_nemo.analysis import stats


def _experiment(rng, *, shift, seeds, prompts, seed_sd, prompt_sd):
    """Arm A and arm B = A + shift + seed effect + per-prompt noise; per-prompt values of each seed."""
    a, b = {}, {}
    for s in range(seeds):
        base = rng.normal(0.5, 0.3, prompts)
        a[s] = base
        b[s] = base + shift + rng.normal(0, seed_sd) + rng.normal(0, prompt_sd, prompts)
    return a, b


@pytest.mark.parametrize("shift,expected", [(0.0, "equivalent"), (0.2, "better"), (-0.2, "worse")])
def test_known_truths(shift, expected):
    a, b = _experiment(np.random.default_rng(1), shift=shift, seeds=10, prompts=256, seed_sd=0.01, prompt_sd=0.2)
    c = stats.compare(a, b, margin=0.05, reps=2000)
    assert c.outcome == expected, c
    assert c.ci95[0] < shift < c.ci95[1]


def test_noisy_is_undecided():
    a, b = _experiment(np.random.default_rng(2), shift=0.0, seeds=3, prompts=64, seed_sd=0.3, prompt_sd=0.3)
    c = stats.compare(a, b, margin=0.05, reps=2000)
    assert c.outcome == "undecided" and c.half_width95 > 0.1


def test_one_seed_interval_is_the_normal_theory_one():
    """With one seed only prompts are resampled: the 95 % interval approaches mean +- 1.96 sd / sqrt(n)."""
    rng = np.random.default_rng(3)
    d = rng.normal(0.1, 1.0, 2000)
    boot = stats.hierarchical_bootstrap([d], reps=4000)
    half = 1.96 * d.std(ddof=1) / math.sqrt(d.size)
    lo, hi = boot["ci"][0.95]
    assert boot["mean"] == pytest.approx(d.mean())
    assert lo == pytest.approx(d.mean() - half, abs=0.15 * half)
    assert hi == pytest.approx(d.mean() + half, abs=0.15 * half)


def test_seed_level_variation_dominates_when_prompts_are_exact():
    """No prompt noise: the interval reflects the spread of the seed means (normal theory over 40 seeds)."""
    rng = np.random.default_rng(4)
    seed_means = rng.normal(0.0, 0.2, 40)
    diffs = [np.full(16, m) for m in seed_means]
    lo, hi = stats.hierarchical_bootstrap(diffs, reps=4000)["ci"][0.95]
    half = 1.96 * seed_means.std(ddof=1) / math.sqrt(seed_means.size)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.2)


def test_coverage_of_the_95_interval():
    rng = np.random.default_rng(5)
    covered = 0
    trials = 60
    for _ in range(trials):
        a, b = _experiment(rng, shift=0.03, seeds=8, prompts=64, seed_sd=0.05, prompt_sd=0.2)
        diffs = stats.paired_differences(a, b)
        lo, hi = stats.hierarchical_bootstrap(diffs, reps=800, seed=int(rng.integers(1e9)))["ci"][0.95]
        covered += lo <= 0.03 <= hi
    assert 0.80 <= covered / trials <= 1.0      # percentile bootstrap with 8 seeds is a little narrow


@pytest.mark.parametrize("pos,neg,p", [(5, 0, 2 / 32), (3, 3, 1.0), (8, 2, 2 * (1 + 10 + 45) / 1024), (0, 0, 1.0)])
def test_sign_test_by_hand(pos, neg, p):
    assert stats.sign_test_p(pos, neg) == pytest.approx(p)


def test_decide_rule():
    assert stats.decide((-0.04, 0.04), (-0.045, 0.045), 0.05) == "equivalent"
    assert stats.decide((0.01, 0.04), (0.005, 0.045), 0.05) == "equivalent"   # significant but inside the margin
    assert stats.decide((0.02, 0.09), (0.01, 0.1), 0.05) == "better"
    assert stats.decide((-0.09, -0.02), (-0.1, -0.01), 0.05) == "worse"
    assert stats.decide((-0.08, 0.09), (-0.1, 0.1), 0.05) == "undecided"


def test_pairs_must_match():
    with pytest.raises(ValueError, match="pair them first"):
        stats.paired_differences({1: np.zeros(3)}, {1: np.zeros(4)})
    assert len(stats.paired_differences({1: np.zeros(3), 2: np.zeros(3)}, {2: np.ones(3)})) == 1


def test_at_budget_and_area_by_hand():
    ys = np.array([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    xs = np.array([10.0, 20.0, 40.0])
    assert stats.at_budget(xs, ys, 15).tolist() == [0.5, 1.0]
    assert stats.at_budget(xs, ys, 30).tolist() == [1.0, 0.5]
    assert stats.at_budget(xs, ys, 5).tolist() == [0.0, 1.0] and stats.at_budget(xs, ys, 99).tolist() == [1.0, 0.0]
    assert stats.area_under_curve(ys).tolist() == [(0.5 + 1.0) / 2, (1.0 + 0.5) / 2]


def test_seeds_needed():
    diffs = [np.full(4, m) for m in (0.1, -0.1, 0.1, -0.1)]
    sd = np.std([0.1, -0.1, 0.1, -0.1], ddof=1)
    assert stats.seeds_needed(diffs, half_width=0.05) == math.ceil((1.96 * sd / 0.05) ** 2)
    assert stats.seeds_needed(diffs[:1], half_width=0.05) is None


def test_seeds_to_decide():
    """The half-width to reach is the larger of |m| (a sign) and margin - |m| (equivalence)."""
    means = [0.02, 0.06, -0.01, 0.05]            # m = 0.03, sd from the four seed means
    diffs = [np.full(3, m) for m in means]
    sd = np.std(means, ddof=1)
    assert stats.seeds_to_decide(diffs, margin=0.05) == math.ceil((1.96 * sd / 0.03) ** 2) == 5  # not 0.02: 10
    assert math.ceil((1.96 * sd / 0.17) ** 2) == 1 and stats.seeds_to_decide(diffs, margin=0.2) == 5  # floor
    assert stats.seeds_to_decide(diffs, margin=0.09) == max(5, math.ceil((1.96 * sd / 0.06) ** 2))  # 0.09 - |m|
    assert stats.seeds_to_decide(diffs[:1], margin=0.05) is None
    # an undecided comparison carries it, a decided one does not
    rng = np.random.default_rng(3)
    noisy = {s: rng.normal(0, 1, 50) for s in range(5)}
    zero = {s: np.zeros(50) for s in range(5)}
    c = stats.compare(zero, noisy, margin=0.05, reps=300)
    assert c.outcome == "undecided" and c.seeds_to_decide is not None and c.seeds_to_decide >= 5
    assert stats.compare(zero, {s: np.full(50, 0.5) for s in range(5)}, margin=0.05, reps=300).seeds_to_decide is None


def test_fewer_than_five_seeds_decide_nothing():
    """A shift of 10 prompt SDs with identical seeds is 'better' from five seeds on, 'undecided' below."""
    for seeds, expected in ((1, "undecided"), (4, "undecided"), (5, "better")):
        a = {s: np.zeros(64) for s in range(seeds)}
        b = {s: np.full(64, 1.0) + np.random.default_rng(s).normal(0, 0.1, 64) for s in range(seeds)}
        c = stats.compare(a, b, margin=0.05, reps=300)
        assert c.outcome == expected and c.ci95[0] > 0.9, (seeds, c)


def test_unequal_prompt_counts_use_the_plain_resampler():
    rng = np.random.default_rng(6)
    diffs = [rng.normal(0.2, 0.1, 100), rng.normal(0.2, 0.1, 50)]
    boot = stats.hierarchical_bootstrap(diffs, reps=500)
    assert boot["mean"] == pytest.approx((diffs[0].mean() + diffs[1].mean()) / 2)
    assert boot["ci"][0.95][0] < boot["mean"] < boot["ci"][0.95][1]
