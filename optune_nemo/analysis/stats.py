"""Paired statistics for comparing two settings of the experiment (pure numpy; no project imports).

The design they serve: every setting of a seed forks from one iteration 0 and shares its sampling keys,
and every run is evaluated on the same held-out prompts. So a comparison of arm B against arm A is made of
paired differences d[s, p] = B[s, p] - A[s, p] for seed s and prompt p, and the two sources of variation
are kept apart: the training trajectory (between seeds) and the evaluation sample (between prompts).

`hierarchical_bootstrap` resamples seeds with replacement, then prompts with replacement within each drawn
seed, using the same indices for both arms (they are differenced first), and returns the percentile
interval of the mean difference. `compare` turns the interval into one of four outcomes against a stated
equivalence margin (two one-sided tests, TOST, at level alpha: the (1 - 2 alpha) interval inside
(-margin, margin) means "equivalent"):

    equivalent   the (1 - 2 alpha) interval lies inside (-margin, +margin)
    better       not equivalent, and the (1 - alpha) interval lies above 0
    worse        not equivalent, and the (1 - alpha) interval lies below 0
    undecided    anything else (the interval is reported, with its width), and always with fewer than
                 MIN_SEEDS seeds

A significant difference smaller than the margin is reported as equivalent: the claims tested are of the
kind "the same quality for less generation", and a difference inside the margin is the same quality by
definition of the margin.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

OUTCOMES = ("equivalent", "better", "worse", "undecided")
MIN_SEEDS = 5
"""Fewer paired seeds decide nothing: a percentile bootstrap over so few seeds understates the spread between
training trajectories (with 3 seeds the t-based interval of the seed means is more than twice as wide), and
between seeds is where the pilot found nearly all the variance."""


def paired_differences(a: dict[int, np.ndarray], b: dict[int, np.ndarray]) -> list[np.ndarray]:
    """Per-seed arrays of B - A over the prompts both arms share, for the seeds both arms have (in seed
    order). `a` and `b` map seed -> per-prompt values in one prompt order."""
    seeds = sorted(set(a) & set(b))
    out = []
    for s in seeds:
        xa, xb = np.asarray(a[s], dtype=np.float64), np.asarray(b[s], dtype=np.float64)
        if xa.shape != xb.shape:
            raise ValueError(f"seed {s}: the arms have {xa.shape} and {xb.shape} prompts; pair them first")
        out.append(xb - xa)
    return out


def hierarchical_bootstrap(diffs: list[np.ndarray], *, reps: int = 4000, seed: int = 0,
                           levels: tuple[float, ...] = (0.90, 0.95)) -> dict:
    """The mean of `diffs` (every seed weighted equally, prompts equally within a seed) and its percentile
    intervals at `levels`, by resampling seeds, then prompts within each drawn seed. Returns
    {"mean", "ci": {level: (lo, hi)}, "reps"}. With one seed only prompts are resampled."""
    if not diffs or any(d.size == 0 for d in diffs):
        raise ValueError("need at least one seed with at least one prompt")
    rng = np.random.default_rng(seed)
    n_seeds = len(diffs)
    est = float(np.mean([d.mean() for d in diffs]))
    stats = np.empty(reps)
    if len({d.size for d in diffs}) == 1:          # the usual case: one prompt set; vectorised in blocks
        table = np.stack(diffs)                      # [seeds, prompts]
        n_prompts = table.shape[1]
        block = max(1, 2_000_000 // (n_seeds * n_prompts))
        for start in range(0, reps, block):
            n = min(block, reps - start)
            picks = rng.integers(0, n_seeds, (n, n_seeds))
            rows = rng.integers(0, n_prompts, (n, n_seeds, n_prompts))
            stats[start:start + n] = table[picks[..., None], rows].mean(axis=(1, 2))
    else:
        for r in range(reps):
            total = 0.0
            for s in rng.integers(0, n_seeds, n_seeds):
                d = diffs[s]
                total += d[rng.integers(0, d.size, d.size)].mean()
            stats[r] = total / n_seeds
    ci = {}
    for level in levels:
        tail = 100 * (1 - level) / 2
        lo, hi = np.percentile(stats, [tail, 100 - tail])
        ci[level] = (float(lo), float(hi))
    return {"mean": est, "ci": ci, "reps": reps}


def sign_count(diffs: list[np.ndarray]) -> dict:
    """Seeds whose mean difference is positive / negative / zero, and the two-sided exact sign-test
    p-value over the non-zero ones (binomial, p = 1/2)."""
    means = [float(d.mean()) for d in diffs]
    pos, neg = sum(m > 0 for m in means), sum(m < 0 for m in means)
    return {"positive": pos, "negative": neg, "zero": len(means) - pos - neg,
            "p_two_sided": sign_test_p(pos, neg)}


def sign_test_p(pos: int, neg: int) -> float:
    """Two-sided exact sign test: P(a count at least as extreme as min(pos, neg)) under Binomial(n, 1/2)."""
    n = pos + neg
    if n == 0:
        return 1.0
    k = min(pos, neg)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Comparison:
    """One comparison's result: B - A, its intervals, the sign count over seeds and the outcome."""

    outcome: str
    mean: float
    ci95: tuple[float, float]
    ci90: tuple[float, float]
    margin: float
    seeds: int
    prompts: int
    positive_seeds: int
    negative_seeds: int
    sign_p: float
    seeds_to_decide: int | None = None
    """Seeds that would likely decide an undecided comparison (`seeds_to_decide`); None when decided or when
    fewer than two seeds give no spread."""
    at: float | None = None
    """Where on its axis the comparison was made, when the caller says (analysis.paired: the last common
    iteration, or the mean budget over seeds in tokens or modelled seconds)."""

    @property
    def half_width95(self) -> float:
        return (self.ci95[1] - self.ci95[0]) / 2

    def to_json(self) -> dict:
        return asdict(self)


def decide(ci90: tuple[float, float], ci95: tuple[float, float], margin: float) -> str:
    """The outcome rule of the module docstring (alpha = 0.05)."""
    if margin > 0 and -margin < ci90[0] and ci90[1] < margin:
        return "equivalent"
    if ci95[0] > 0:
        return "better"
    if ci95[1] < 0:
        return "worse"
    return "undecided"


def compare(a: dict[int, np.ndarray], b: dict[int, np.ndarray], *, margin: float, reps: int = 4000,
            seed: int = 0) -> Comparison:
    """Arm B against arm A, paired by seed and prompt (see the module docstring)."""
    diffs = paired_differences(a, b)
    boot = hierarchical_bootstrap(diffs, reps=reps, seed=seed)
    signs = sign_count(diffs)
    ci90, ci95 = boot["ci"][0.90], boot["ci"][0.95]
    outcome = decide(ci90, ci95, margin) if len(diffs) >= MIN_SEEDS else "undecided"
    return Comparison(outcome=outcome, mean=boot["mean"], ci95=ci95, ci90=ci90, margin=margin,
                      seeds=len(diffs), prompts=int(diffs[0].size), positive_seeds=signs["positive"],
                      negative_seeds=signs["negative"], sign_p=signs["p_two_sided"],
                      seeds_to_decide=seeds_to_decide(diffs, margin=margin) if outcome == "undecided" else None)


def seeds_needed(diffs: list[np.ndarray], *, half_width: float) -> int | None:
    """How many seeds would bring the 95 % interval's half-width down to `half_width`, from the spread of
    the per-seed mean differences (normal approximation: 1.96 * sd / sqrt(n)); None with fewer than two
    seeds to estimate the spread from."""
    means = np.array([d.mean() for d in diffs])
    if means.size < 2:
        return None
    sd = float(means.std(ddof=1))
    return max(2, math.ceil((1.96 * sd / half_width) ** 2))


def seeds_to_decide(diffs: list[np.ndarray], *, margin: float) -> int | None:
    """Seeds that would decide a comparison if its mean difference m stayed what it is: the 95 % half-width
    has to fall below |m| (better / worse) or below margin - |m| (equivalent), whichever is larger
    (`seeds_needed`'s normal approximation over the per-seed means), at least MIN_SEEDS. None with fewer
    than two seeds, or
    when m = 0 and the margin is 0 (nothing would decide it)."""
    m = abs(float(np.mean([d.mean() for d in diffs])))
    target = max(m, margin - m)
    if target <= 0:
        return None
    need = seeds_needed(diffs, half_width=target)
    return None if need is None else max(MIN_SEEDS, need)


def at_budget(xs: np.ndarray, ys: np.ndarray, budget: float) -> np.ndarray:
    """Per-prompt values at an equal cost: `xs` the run's cumulative cost (tokens or modelled seconds) at
    each evaluated iteration (increasing), `ys` [iterations, prompts] the per-prompt values there; linear
    interpolation between the two evaluations around `budget` (clamped to the ends)."""
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if xs.ndim != 1 or ys.shape[0] != xs.size:
        raise ValueError("xs must be [iterations] and ys [iterations, prompts]")
    if budget <= xs[0]:
        return ys[0].copy()
    if budget >= xs[-1]:
        return ys[-1].copy()
    j = int(np.searchsorted(xs, budget))
    w = (budget - xs[j - 1]) / (xs[j] - xs[j - 1])
    return (1 - w) * ys[j - 1] + w * ys[j]


def area_under_curve(ys: np.ndarray) -> np.ndarray:
    """Per-prompt mean over the evaluated iterations ([iterations, prompts] -> [prompts]): the "learns
    faster" endpoint (equal weight per iteration, trapezoids on a unit grid)."""
    ys = np.asarray(ys, dtype=np.float64)
    if ys.shape[0] == 1:
        return ys[0].copy()
    return (ys[:-1] + ys[1:]).sum(axis=0) / (2 * (ys.shape[0] - 1))
