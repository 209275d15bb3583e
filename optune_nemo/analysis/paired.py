"""Paired, per-prompt comparisons of two settings of an experiment, in three views (docs/evaluation.md).

Inputs are run directories as `optune_nemo.analysis.report` loads them (duck-typed here: `path`, `seed`,
`records`), with the per-prompt held-out records the evaluator writes
(`exp_dir/eval/iter_NNNNNN.parquet`; a fork's inherited iterations are read from its source run). Two runs
are paired when they share a seed (every setting of a seed forks from one iteration 0); prompts are paired
by prompt id.

Views of "B against A" for an endpoint (`success`, the task's exact-answer flag, primary for built-in
tasks; `gold_reward`, secondary):
    iterations   per-prompt values after the last iteration both arms evaluated;
    tokens       at equal cumulative generated tokens: both arms interpolated per prompt at the smaller of
                 the two arms' final totals (iteration 0 included);
    time         the same at equal modelled time (`modelled_seconds`);
    auc          the per-prompt mean over the evaluated iterations: the "learns faster" endpoint.
Each view is a `stats.Comparison` (hierarchical bootstrap over seeds and prompts, TOST outcome).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

import numpy as np

from optune_nemo.analysis import stats

PROMPT_RECORDS = "eval"
VIEWS = ("iterations", "tokens", "time", "auc")
PHASES = (("time_generation_s", "generated_tokens"), ("time_reward_s", "regenerated"),
          ("time_reference_s", "train_pairs"), ("time_train_s", "train_pairs"))
"""(phase seconds, the work it scales with) of an iteration record: the modelled time's terms."""


def records_path(run_dir: Path, t: int, _depth: int = 0) -> Path | None:
    """eval/iter_t.parquet of a run directory, following fork.json into the source run for the iterations
    it inherited."""
    own = Path(run_dir) / PROMPT_RECORDS / f"iter_{t:06d}.parquet"
    if own.is_file():
        return own
    fork_file = Path(run_dir) / "fork.json"
    if _depth > 8 or not fork_file.is_file():
        return None
    fork = json.loads(fork_file.read_text())
    if t > int(fork["iteration"]):
        return None
    source = Path(fork["init_from"])
    if not source.is_absolute() and not source.exists():
        source = Path(run_dir) / source
    return records_path(source.parent.parent, t, _depth + 1)


def prompt_curve(run, key: str) -> tuple[list[int], np.ndarray] | None:
    """(iterations with records, values [iterations, prompts] in prompt-id order) of `key`, or None when the
    run has no per-prompt records of it."""
    import pyarrow.parquet as pq

    its, rows, ids = [], [], None
    for t in sorted({int(r["iteration"]) for r in run.records}):
        path = records_path(run.path, t)
        if path is None:
            continue
        table = pq.read_table(path).to_pydict()
        if key not in table:
            return None
        order = np.argsort(table["prompt_id"])
        these = [table["prompt_id"][i] for i in order]
        if ids is not None and these != ids:
            raise ValueError(f"{path}: held-out prompts differ from the run's other evaluations")
        ids = these
        its.append(t)
        rows.append(np.asarray(table[key], dtype=np.float64)[order])
    return (its, np.stack(rows)) if rows else None


def phase_rates(runs) -> dict[str, float]:
    """Seconds per unit of work of each phase (PHASES), the median over every iteration t >= 1 of every run:
    one rate for the whole experiment, so a run that shared the machine is not charged for it."""
    rates = {}
    for secs, work in PHASES:
        per = [float(r[secs]) / float(r[work]) for run in runs for r in run.records
               if int(r["iteration"]) >= 1 and r.get(secs) is not None and r.get(work)]
        rates[secs] = statistics.median(per) if per else 0.0
    return rates


def cumulative(run, x: str, rates: dict[str, float] | None = None) -> dict[int, float]:
    """{t: cost of iterations 0..t}: `tokens` (generated tokens) or `time` (modelled seconds: each phase's
    work times its experiment-wide rate)."""
    out, total = {}, 0.0
    for r in sorted(run.records, key=lambda r: int(r["iteration"])):
        if x == "tokens":
            total += float(r.get("generated_tokens") or 0)
        else:
            total += sum(float(r.get(work) or 0) * rates[secs] for secs, work in PHASES)
        out[int(r["iteration"])] = total
    return out


def _view_values(run, key: str, view: str, budget: float | None, rates, common: list[int]) -> np.ndarray:
    its, ys = prompt_curve(run, key)
    keep = [i for i, t in enumerate(its) if t in common]
    its, ys = [its[i] for i in keep], ys[keep]
    if view == "iterations":
        return ys[-1]
    if view == "auc":
        return stats.area_under_curve(ys)
    cum = cumulative(run, view, rates)
    return stats.at_budget(np.array([cum[t] for t in its]), ys, budget)


def compare_runs(base_runs, other_runs, *, key: str, margin: float, rates: dict[str, float],
                 reps: int = 4000) -> dict[str, stats.Comparison] | None:
    """Every view of `other` (B) against `base` (A) for `key`, paired by seed; None without a shared seed
    that has per-prompt records in both arms."""
    a_by_seed = {r.seed: r for r in base_runs if prompt_curve(r, key) is not None}
    b_by_seed = {r.seed: r for r in other_runs if prompt_curve(r, key) is not None}
    seeds = sorted(set(a_by_seed) & set(b_by_seed))
    if not seeds:
        return None
    out = {}
    for view in VIEWS:
        a_vals, b_vals, at = {}, {}, []
        for s in seeds:
            ra, rb = a_by_seed[s], b_by_seed[s]
            common = sorted(set(prompt_curve(ra, key)[0]) & set(prompt_curve(rb, key)[0]))
            if not common:
                continue
            budget = None
            if view in ("tokens", "time"):
                ca, cb = cumulative(ra, view, rates), cumulative(rb, view, rates)
                budget = min(ca[common[-1]], cb[common[-1]])
            a_vals[s] = _view_values(ra, key, view, budget, rates, common)
            b_vals[s] = _view_values(rb, key, view, budget, rates, common)
            at.append(common[-1] if view == "iterations" else budget)
        if a_vals:
            c = stats.compare(a_vals, b_vals, margin=margin, reps=reps)
            out[view] = dataclasses.replace(c, at=None if view == "auc" else float(statistics.mean(at)))
    return out or None
