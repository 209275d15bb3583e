"""The experiment report: `python -m optune_nemo.report RUN_DIR... --out DIR`.

Reads finished (or running) run directories, groups them into settings (rho, selection, loss, training
on/off) with their seeds, and writes `report.md`, `report.json` (every number of the Markdown, unrounded)
and PNG figures into DIR. A directory without `config.yaml` is searched for run directories below it, so
a sweep's root can be given as is. A run that another given run was forked from (a sweep's shared
iteration 0) is not a setting of its own: its iteration 0 is in the forks' records already.

What a run directory holds (written by `python -m optune_nemo.train`):
  config.yaml                   the resolved config (optune.rho, optune.selection, loss.name, seed,
                                train.epochs_per_iteration: 0 is a no-training control run)
  metrics.jsonl                 one record per iteration (generated_tokens, time_*_s, and eval_* where the
                                held-out evaluation ran); a fork's begins with its source's inherited records
  eval.json                     {"baseline": {...}, "iterations": {"t": {...}}}: the starting policy, then per t
  fork.json                     forks only: {"init_from": ".../checkpoints/iter_NNNNNN", "iteration": N}
  checkpoints/iter_NNNNNN/rollouts.parquet   the rollout store after iteration N (a fork's iterations
                                <= N are in its source's checkpoints)

What the report computes (spread over seeds: mean and [min, max], with n the number of runs):
  - held-out gold reward (eval_reward_mean) and win score (eval_win_score, eq. 7) per iteration, and the
    same against cumulative generated tokens and cumulative wall-clock seconds (iteration 0 included);
  - speed-up of each rho over rho = 1 (same loss, training and seeds): mean seconds per iteration t >= 1 at
    rho = 1 over that at rho, next to Amdahl's bound 1 / (1 - g + g * rho) with g the generation share
    sum(time_generation_s) / sum(time_total_s) over iterations t >= 1 of the rho = 1 runs (and the bound
    with g counting reward time too, which also scales with rho);
  - the paper's Fig. 2 for rho = 1 runs: per iteration t >= 1, the change of each prompt's ranking score
    max(r_a, r_b) from store t-1 to store t, split between the prompts ranked in the bottom 50 % at t-1
    (the ceil(N/2) that OPTune with rho = 0.5 would regenerate) and the rest. `bottom` and `top` are each
    half's sum of changes divided by N, so bottom + top = the change of the mean ranking score, and
    share_bottom = bottom / (bottom + top). In no-training control runs the policy never changes, so their
    gain is regression to the mean alone; the trained runs' gain beyond the control's is attributed to
    training.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from optune_nemo.config import ConfigError, OptuneNemoConfig, config_from_yaml, num_regenerated
from optune_nemo.runtime.fileio import write_json_atomic, write_text_atomic
from optune_nemo.selection.scores import select_lowest

log = logging.getLogger(__name__)

STORE_FILE = "rollouts.parquet"
FORK_FILE = "fork.json"
EVAL_KEYS = {"eval_reward_mean": "reward_mean", "eval_win_score": "win_score", "eval_accuracy": "accuracy",
             "eval_response_tokens_mean": "response_tokens_mean"}
"""metrics.jsonl key -> the same number's key in eval.json's per-iteration entries (the fallback)."""


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True, order=True)
class Setting:
    """What a run varies apart from its seed."""

    rho: float
    selection: str
    loss: str
    trained: bool
    num_samples: int = 2
    """generation.num_samples (2, the paper's setting, is left out of the label)."""

    @property
    def label(self) -> str:
        return (f"rho={self.rho:g} {self.selection} {self.loss}" + ("" if self.trained else " no-training")
                + (f" n={self.num_samples}" if self.num_samples != DEFAULT_SAMPLES else ""))

    @property
    def paper_n(self) -> bool:
        """Whether the setting draws the paper's two samples per regenerated prompt."""
        return self.num_samples == DEFAULT_SAMPLES


DEFAULT_SAMPLES = 2
"""generation.num_samples of the paper: the settings every other is compared with."""


@dataclass
class Run:
    path: Path
    cfg: OptuneNemoConfig
    records: list[dict]
    evals: dict
    fork: dict | None
    completed: bool

    @property
    def seed(self) -> int:
        return self.cfg.seed

    @property
    def setting(self) -> Setting:
        c = self.cfg
        return Setting(float(c.optune.rho), c.optune.selection, c.loss.name, c.train.epochs_per_iteration > 0,
                       int(c.generation.num_samples))

    def record(self, t: int) -> dict | None:
        return next((r for r in self.records if r.get("iteration") == t), None)

    def value(self, t: int, key: str) -> float | None:
        """A number of iteration t's record, else of eval.json's entry for t (eval_* keys), else None."""
        rec = self.record(t) or {}
        v = _num(rec.get(key))
        if v is None and key in EVAL_KEYS:
            v = _num(self.evals.get("iterations", {}).get(str(t), {}).get(EVAL_KEYS[key]))
        return v

    def cumulative(self, key: str) -> dict[int, float]:
        """{t: sum of `key` over iterations 0..t} (a fork's inherited iterations included)."""
        out, total = {}, 0.0
        for r in sorted(self.records, key=lambda r: r["iteration"]):
            total += _num(r.get(key)) or 0.0
            out[r["iteration"]] = total
        return out

    def source_dir(self) -> Path | None:
        """The run directory this run was forked from."""
        if not self.fork:
            return None
        return _resolve(self.fork["init_from"], self.path).parent.parent


def _num(v) -> float | None:
    """A finite float, or None (metrics.jsonl writes non-finite numbers as strings)."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _resolve(path: str, run_dir: Path) -> Path:
    """A path from fork.json: absolute, or relative to the working directory, else to the run directory."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return run_dir / p


def load_run(path: str | Path) -> Run:
    """One run directory (config.yaml and metrics.jsonl are required)."""
    path = Path(path)
    try:
        cfg = config_from_yaml((path / "config.yaml").read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not a run directory (no config.yaml)") from None
    records = []
    metrics = path / "metrics.jsonl"
    for line in (metrics.read_text().splitlines() if metrics.is_file() else []):
        try:
            records.append(json.loads(line))
        except ValueError:
            continue      # a line torn by a kill mid-write
    evals = json.loads((path / "eval.json").read_text()) if (path / "eval.json").is_file() else {}
    fork = json.loads((path / FORK_FILE).read_text()) if (path / FORK_FILE).is_file() else None
    return Run(path, cfg, records, evals, fork, (path / "COMPLETED").is_file())


def find_runs(paths: list[str | Path], max_depth: int = 4) -> list[Run]:
    """Run directories given or found below the given directories (config.yaml marks one)."""
    found: list[Path] = []

    def walk(p: Path, depth: int) -> None:
        if (p / "config.yaml").is_file():
            found.append(p)
        elif depth < max_depth and p.is_dir():
            for child in sorted(p.iterdir()):
                if child.is_dir() and child.name not in ("checkpoints", "partial", "hf", "tensorboard"):
                    walk(child, depth + 1)

    for p in paths:
        if not Path(p).is_dir():
            raise ConfigError(f"{p}: no such directory")
        walk(Path(p), 0)
    seen, runs = set(), []
    for p in found:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            runs.append(load_run(p))
    return runs


def fork_sources(runs: list[Run]) -> set[Path]:
    """Resolved directories of the runs that some given run was forked from."""
    return {r.source_dir().resolve() for r in runs if r.source_dir() is not None}


def store_path(run_dir: Path, t: int, _depth: int = 0) -> Path | None:
    """The rollout store after iteration t of a run, following fork.json into the source run."""
    own = run_dir / "checkpoints" / f"iter_{t:06d}" / STORE_FILE
    if own.is_file():
        return own
    fork_file = run_dir / FORK_FILE
    if _depth > 8 or not fork_file.is_file():
        return None
    fork = json.loads(fork_file.read_text())
    if t > int(fork["iteration"]):
        return None
    source_ckpt = _resolve(fork["init_from"], run_dir)
    there = source_ckpt.parent / f"iter_{t:06d}" / STORE_FILE
    return there if there.is_file() else store_path(source_ckpt.parent.parent, t, _depth + 1)


def ranking_scores(path: Path) -> dict[int, float]:
    """{prompt_id: max(r_a, r_b)} of a stored rollout store, over prompts that have a pair: the rule of
    `RolloutStore.ranking_scores` (docs/algorithm.md), read from the file's two reward columns alone."""
    import pyarrow.parquet as pq

    cols = pq.read_table(path, columns=["prompt_id", "reward_a", "reward_b"]).to_pydict()
    return {int(p): max(float(a), float(b)) for p, a, b in zip(cols["prompt_id"], cols["reward_a"], cols["reward_b"])
            if a is not None and b is not None}


# --------------------------------------------------------------------------- statistics


def spread(values: list[float]) -> dict:
    """mean, min, max and n of the finite values (None entries dropped)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "min": None, "max": None, "n": 0}
    return {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def seed_spread(values: list[float]) -> dict:
    """The seed-to-seed spread of one setting's values (one per seed): mean, sample SD (n - 1), n and the values;
    sd is None below two values."""
    vals = [v for v in values if v is not None]
    n = len(vals)
    mean = sum(vals) / n if n else None
    sd = (sum((v - mean) ** 2 for v in vals) / (n - 1)) ** 0.5 if n >= 2 else None
    return {"mean": mean, "sd": sd, "n": n, "values": vals}


FINAL_KEYS = ("eval_accuracy", "eval_reward_mean")


def finals(runs: list[Run]) -> dict:
    """Per key of FINAL_KEYS, the seed spread at the last iteration that every run of the setting evaluated
    (the pilot's measure of trajectory noise: the held-out prompts are the same for every seed)."""
    out = {}
    for key in FINAL_KEYS:
        common = set.intersection(*({r["iteration"] for r in run.records if _num(r.get(key)) is not None}
                                    for run in runs)) if runs else set()
        if common:
            t = max(common)
            out[key] = {"iteration": t, **seed_spread([run.value(t, key) for run in runs])}
    return out


def group_settings(runs: list[Run]) -> dict[Setting, list[Run]]:
    """Runs by setting (seed order); fork sources left out (see the module docstring)."""
    sources = fork_sources(runs)
    groups: dict[Setting, list[Run]] = defaultdict(list)
    for r in runs:
        if r.path.resolve() not in sources:
            groups[r.setting].append(r)
    return {s: sorted(rs, key=lambda r: (r.seed, str(r.path))) for s, rs in sorted(groups.items())}


def iterations_of(runs: list[Run]) -> list[int]:
    return sorted({r["iteration"] for run in runs for r in run.records})


def curve(runs: list[Run], key: str) -> list[dict]:
    """Per iteration: spread over runs of `key`, with the spread of cumulative generated tokens and
    wall-clock seconds at that iteration (the x positions of the cost plots)."""
    out = []
    tokens = {id(r): r.cumulative("generated_tokens") for r in runs}
    seconds = {id(r): r.cumulative("time_total_s") for r in runs}
    for t in iterations_of(runs):
        have = [r for r in runs if r.value(t, key) is not None]
        if not have:
            continue
        out.append({"iteration": t, **spread([r.value(t, key) for r in have]),
                    "cumulative_tokens": spread([tokens[id(r)].get(t) for r in have]),
                    "cumulative_time_s": spread([seconds[id(r)].get(t) for r in have])})
    return out


def mean_iteration_time(run: Run, first: int = 1) -> float | None:
    """Mean time_total_s over the run's iterations t >= first."""
    return spread([_num(r.get("time_total_s")) for r in run.records if r["iteration"] >= first])["mean"]


def generation_share(runs: list[Run], *, with_reward: bool = False, first: int = 1) -> float | None:
    """g = sum(time_generation_s [+ time_reward_s]) / sum(time_total_s) over iterations t >= first."""
    gen = total = 0.0
    for run in runs:
        for r in run.records:
            if r["iteration"] >= first:
                gen += (_num(r.get("time_generation_s")) or 0.0) + (
                    (_num(r.get("time_reward_s")) or 0.0) if with_reward else 0.0)
                total += _num(r.get("time_total_s")) or 0.0
    return gen / total if total > 0 else None


def amdahl_bound(g: float, rho: float) -> float:
    """Speed-up when only the share g of the time shrinks by the factor rho: 1 / (1 - g + g * rho)."""
    return 1.0 / (1.0 - g + g * rho)


def _phase_mean(runs: list[Run], keys: tuple[str, ...], first: int = 1) -> float | None:
    """Mean over the runs' iterations t >= first of the summed `keys` (seconds)."""
    return spread([sum(_num(r.get(k)) or 0.0 for k in keys) for run in runs for r in run.records
                   if r["iteration"] >= first])["mean"]


def predicted_speedup(reference: list[Run], runs: list[Run]) -> float | None:
    """T1 / (T1 - G1 + G_rho): the rho = 1 runs' mean seconds per iteration T1, with their generation and
    reward seconds G1 replaced by the setting's own G_rho (measured, so shorter answers are accounted for).
    A prediction, not a bound: the other phases are assumed to take what they take at rho = 1."""
    t1 = _phase_mean(reference, ("time_total_s",))
    g1 = _phase_mean(reference, ("time_generation_s", "time_reward_s"))
    g_rho = _phase_mean(runs, ("time_generation_s", "time_reward_s"))
    if None in (t1, g1, g_rho) or t1 - g1 + g_rho <= 0:
        return None
    return t1 / (t1 - g1 + g_rho)


def speedups(groups: dict[Setting, list[Run]]) -> list[dict]:
    """Each setting against the rho = 1 runs (n = 2) of the same loss and training, over their common seeds."""
    out = []
    for s, runs in groups.items():
        refs = [r for ref_s, rr in groups.items() for r in rr
                if ref_s.rho == 1.0 and ref_s.loss == s.loss and ref_s.trained == s.trained and ref_s.paper_n]
        seeds = sorted({r.seed for r in runs} & {r.seed for r in refs})
        mine = [r for r in runs if r.seed in seeds]
        theirs = [r for r in refs if r.seed in seeds]
        t_mine = spread([mean_iteration_time(r) for r in mine])
        t_ref = spread([mean_iteration_time(r) for r in theirs])
        if not seeds or t_mine["mean"] is None or t_ref["mean"] is None:
            continue
        per_seed = []
        for seed in seeds:
            a = spread([mean_iteration_time(r) for r in theirs if r.seed == seed])["mean"]
            b = spread([mean_iteration_time(r) for r in mine if r.seed == seed])["mean"]
            if a is not None and b:
                per_seed.append(a / b)
        g, g_r = generation_share(theirs), generation_share(theirs, with_reward=True)
        total_ref = sum(sum(_num(x.get("time_total_s")) or 0.0 for x in r.records) for r in theirs)
        total_mine = sum(sum(_num(x.get("time_total_s")) or 0.0 for x in r.records) for r in mine)
        out.append({"setting": s.label, "rho": s.rho, "seeds": seeds, "time_per_iteration_s": t_mine,
                    "speedup_end_to_end": total_ref / total_mine if total_mine else None,
                    "predicted_speedup": predicted_speedup(theirs, mine),
                    "reference_time_per_iteration_s": t_ref, "speedup": t_ref["mean"] / t_mine["mean"],
                    "speedup_per_seed": spread(per_seed), "speedup_per_seed_ci95": _seed_ci95(per_seed),
                    "generation_share": g,
                    "amdahl_bound": amdahl_bound(g, s.rho) if g is not None else None,
                    "generation_reward_share": g_r,
                    "amdahl_bound_generation_reward": amdahl_bound(g_r, s.rho) if g_r is not None else None})
    return out


def _seed_ci95(values: list[float]) -> list[float] | None:
    """95 % bootstrap interval (over seeds) of the mean of per-seed values; None with fewer than 2 seeds."""
    if len(values) < 2:
        return None
    import numpy as np

    from optune_nemo.analysis.stats import hierarchical_bootstrap

    return list(hierarchical_bootstrap([np.array([v]) for v in values], reps=4000)["ci"][0.95])


def gain_split(previous: dict[int, float], current: dict[int, float]) -> dict:
    """The Fig. 2 split of the change in ranking score between two stores (see the module docstring).
    Prompts in both stores only; the bottom half is the ceil(N/2) lowest at `previous` (ties: smaller id)."""
    ids = sorted(set(previous) & set(current))
    if not ids:
        raise ValueError("gain split: the two stores share no scored prompt")
    n = len(ids)
    bottom = set(select_lowest([previous[i] for i in ids], ids, num_regenerated(0.5, n)))
    g_bottom = sum(current[i] - previous[i] for i in ids if i in bottom) / n
    g_top = sum(current[i] - previous[i] for i in ids if i not in bottom) / n
    total = g_bottom + g_top
    return {"n": n, "n_bottom": len(bottom), "bottom": g_bottom, "top": g_top, "total": total,
            "share_bottom": g_bottom / total if total != 0 else None}


def fig2_analysis(groups: dict[Setting, list[Run]]) -> dict:
    """gain_split for every iteration t >= 1 of every rho = 1 run (n = 2), averaged per (trained loss | control,
    t), and the part of the trained runs' gain beyond the control runs' (attributed to training)."""
    rows, missing = [], []
    for s, runs in groups.items():
        if s.rho != 1.0 or not s.paper_n:
            continue
        for run in runs:
            for t in iterations_of([run]):
                if t < 1:
                    continue
                prev, cur = store_path(run.path, t - 1), store_path(run.path, t)
                if prev is None or cur is None:
                    missing.append(f"{run.path} iteration {t}")
                    continue
                rows.append({"run": str(run.path), "seed": run.seed, "setting": s.label, "trained": s.trained,
                             "group": _fig2_group(s), "iteration": t,
                             **gain_split(ranking_scores(prev), ranking_scores(cur))})
    summary = []
    for (group, t), rs in sorted(_by(rows, lambda r: (r["group"], r["iteration"])).items()):
        b, tp, tot = (spread([r[k] for r in rs])["mean"] for k in ("bottom", "top", "total"))
        summary.append({"group": group, "iteration": t, "n": len(rs), "bottom": b, "top": tp, "total": tot,
                        "share_bottom": b / tot if tot else None})
    control = {r["iteration"]: r for r in summary if r["group"] == "control"}
    attribution = []
    for r in summary:
        c = control.get(r["iteration"])
        if r["group"] == "control" or c is None:
            continue
        excess_b, excess_t = r["bottom"] - c["bottom"], r["total"] - c["total"]
        attribution.append({"group": r["group"], "iteration": r["iteration"], "bottom_trained": r["bottom"],
                            "bottom_control": c["bottom"], "bottom_from_training": excess_b,
                            "total_trained": r["total"], "total_control": c["total"],
                            "total_from_training": excess_t,
                            "share_bottom_of_training_gain": excess_b / excess_t if excess_t else None,
                            "bottom_regression_fraction": c["bottom"] / r["bottom"] if r["bottom"] else None})
    return {"rows": rows, "summary": summary, "attribution": attribution, "missing_stores": missing,
            "contrast": fig2_contrast(rows)}


def fig2_contrast(rows: list[dict]) -> list[dict]:
    """A well-conditioned Fig. 2 statistic: per run and iteration the mean gain of a bottom-half prompt minus
    that of a top-half prompt (d = bottom N / n_bottom - top N / (N - n_bottom)); per trained group and t,
    d(trained) - d(control) paired by seed, with a 95 % bootstrap interval over seeds (None with one seed).
    Positive: training lifts the bottom half more than regression to the mean does."""
    import numpy as np

    def d(r):
        if r["n_bottom"] in (0, r["n"]):
            return None
        return r["bottom"] * r["n"] / r["n_bottom"] - r["top"] * r["n"] / (r["n"] - r["n_bottom"])

    control = {(r["seed"], r["iteration"]): d(r) for r in rows if r["group"] == "control"}
    out = []
    for (group, t), rs in sorted(_by([r for r in rows if r["group"] != "control"],
                                     lambda r: (r["group"], r["iteration"])).items()):
        diffs = [d(r) - control[(r["seed"], t)] for r in rs
                 if d(r) is not None and control.get((r["seed"], t)) is not None]
        if not diffs:
            continue
        out.append({"group": group, "iteration": t, "seeds": len(diffs), "mean": float(np.mean(diffs)),
                    "ci95": _seed_ci95(diffs)})
    return out


def _fig2_group(s: Setting) -> str:
    return f"trained {s.loss}" if s.trained else "control"


def _by(rows, key) -> dict:
    out = defaultdict(list)
    for r in rows:
        out[key(r)].append(r)
    return out


# --------------------------------------------------------------------------- the report


@dataclass
class Report:
    """Everything report.md shows; `to_json` is report.json."""

    runs: list[dict] = field(default_factory=list)
    settings: list[dict] = field(default_factory=list)
    baseline: dict = field(default_factory=dict)
    curves: dict = field(default_factory=dict)
    speedup: list[dict] = field(default_factory=list)
    fig2: dict = field(default_factory=dict)
    paired: list[dict] = field(default_factory=list)
    finals: dict = field(default_factory=dict)
    margin: float = 0.05
    figures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in ("runs", "settings", "baseline", "curves", "speedup", "fig2", "paired",
                                              "finals", "margin", "figures", "notes")}


ENDPOINTS = (("success", "exact accuracy"), ("gold_reward", "gold reward"))
"""Per-prompt endpoints of the paired comparisons: the task's exact-answer flag (primary, built-in tasks),
then the held-out gold reward (secondary; the training reward may be shaped)."""


def paired_comparisons(rep: Report, groups: dict[Setting, list[Run]], *, margin: float, reps: int) -> list[dict]:
    """Every `comparisons` pair, per endpoint, in every view of analysis.paired (B = the setting, A = its
    baseline); pairs without per-prompt records are left out (a note says so)."""
    from optune_nemo.analysis import paired

    by_label = {s.label: rs for s, rs in groups.items()}
    rates = paired.phase_rates([r for rs in groups.values() for r in rs])
    out = []
    for setting, baseline in comparisons(rep.settings):
        for key, name in ENDPOINTS:
            views = paired.compare_runs(by_label[baseline], by_label[setting], key=key, margin=margin, rates=rates,
                                        reps=reps)
            if views:
                out.append({"setting": setting, "baseline": baseline, "endpoint": key, "endpoint_name": name,
                            "views": {v: c.to_json() for v, c in views.items()}})
    return out


def read_report(path: str | Path) -> Report:
    """A recorded report.json as a Report (keys it does not know are refused in one line)."""
    try:
        data = json.loads(Path(path).read_text())
        return Report(**data)
    except FileNotFoundError:
        raise ConfigError(f"--from-json: {path}: no such file") from None
    except (ValueError, TypeError) as e:
        raise ConfigError(f"--from-json: {path}: not a report.json ({str(e).splitlines()[0]})") from None


def analyse(runs: list[Run], *, margin: float = 0.05, reps: int = 4000) -> Report:
    """All numbers of the report (no files written). `margin`: the equivalence margin of the paired
    comparisons (in the endpoint's units: accuracy, reward)."""
    groups = group_settings(runs)
    rep = Report(margin=margin)
    sources = fork_sources(runs)
    rep.runs = [{"path": str(r.path), "setting": r.setting.label, "seed": r.seed, "completed": r.completed,
                 "iterations": len(r.records), "forked_from": str(r.source_dir()) if r.fork else None,
                 "fork_source": r.path.resolve() in sources} for r in runs]
    for s, rs in groups.items():
        rep.settings.append({"label": s.label, "rho": s.rho, "selection": s.selection, "loss": s.loss,
                             "trained": s.trained, "num_samples": s.num_samples, "seeds": [r.seed for r in rs],
                             "runs": [str(r.path) for r in rs]})
        rep.curves[s.label] = {key: curve(rs, key) for key in ("eval_accuracy", "eval_reward_mean", "eval_win_score")}
        rep.finals[s.label] = finals(rs)
    rep.baseline = spread([_num(r.evals.get("baseline", {}).get("reward_mean")) for rs in groups.values() for r in rs])
    rep.speedup = speedups(groups)
    if not any(s.rho == 1.0 for s in groups):
        rep.notes.append("no rho = 1 runs: no speed-up and no Fig. 2 analysis")
    rep.fig2 = fig2_analysis(groups)
    if rep.fig2["missing_stores"]:
        rep.notes.append(f"Fig. 2: {len(rep.fig2['missing_stores'])} iteration(s) skipped, their rollout stores are "
                         "gone (checkpoint.keep_last?)")
    rep.paired = paired_comparisons(rep, groups, margin=margin, reps=reps)
    if comparisons(rep.settings) and not rep.paired:
        rep.notes.append("no per-prompt held-out records (exp_dir/eval/*.parquet) in these runs: no paired "
                         "comparison (runs recorded before they existed, or eval.num_prompts=0)")
    if not any(not s.trained and s.rho == 1.0 for s in groups):
        rep.notes.append("no no-training control run at rho = 1 (train.epochs_per_iteration=0): the Fig. 2 gain "
                         "cannot be split into training and regression to the mean")
    return rep


def _f(x, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}g}"


def _cell(s: dict) -> str:
    if not s or s.get("n", 0) == 0:
        return "–"
    if s["n"] == 1:
        return f"{_f(s['mean'])} (n=1)"
    return f"{_f(s['mean'])} [{_f(s['min'])}, {_f(s['max'])}] (n={s['n']})"


def _curve_table(rep: Report, key: str) -> list[str]:
    its = sorted({p["iteration"] for c in rep.curves.values() for p in c.get(key, [])})
    if not its:
        return ["(not evaluated in these runs)", ""]
    lines = ["| setting | " + " | ".join(f"t={t}" for t in its) + " |", "|---" * (len(its) + 1) + "|"]
    for label, c in rep.curves.items():
        by_t = {p["iteration"]: p for p in c.get(key, [])}
        lines.append(f"| {label} | " + " | ".join(_cell(by_t.get(t, {})) for t in its) + " |")
    return lines + [""]


def render_markdown(rep: Report) -> str:
    out = ["# OPTune experiment report", "",
           f"{len(rep.runs)} run directories, {len(rep.settings)} settings. Every cell: mean over seeds "
           "[min, max] (n = number of runs). Iteration 0 is shared by the runs forked from one base run.", ""]
    out += ["## Settings", "", "| setting | seeds | runs |", "|---|---|---|"]
    out += [f"| {s['label']} | {', '.join(map(str, s['seeds']))} | {len(s['runs'])} |" for s in rep.settings]
    out += ["", "## Held-out gold reward per iteration (eval_reward_mean)", "",
            f"Starting policy (the baseline of the win score): {_cell(rep.baseline)}.", ""]
    out += _curve_table(rep, "eval_reward_mean")
    out += ["## Held-out exact accuracy per iteration (eval_accuracy: the task's success flag)", ""]
    out += _curve_table(rep, "eval_accuracy")
    out += ["## Win score per iteration (eq. 7: 50 + 100 (n_win - n_lose) / n, range [-50, 150])", ""]
    out += _curve_table(rep, "eval_win_score")
    out += ["## Cost at the last evaluated iteration", "",
            "| setting | iteration | gold reward | win score | cumulative generated tokens | cumulative seconds |",
            "|---|---|---|---|---|---|"]
    for label, c in rep.curves.items():
        pts = c["eval_reward_mean"] or c["eval_win_score"]
        if not pts:
            continue
        last = pts[-1]
        win = {p["iteration"]: p for p in c["eval_win_score"]}.get(last["iteration"], {})
        rew = {p["iteration"]: p for p in c["eval_reward_mean"]}.get(last["iteration"], {})
        out.append(f"| {label} | {last['iteration']} | {_cell(rew)} | {_cell(win)} | "
                   f"{_cell(last['cumulative_tokens'])} | {_cell(last['cumulative_time_s'])} |")
    out += ["", "## Speed-up over rho = 1 (seconds per iteration, t >= 1)", "",
            "Measured: mean seconds per iteration of the rho = 1 runs over that of the setting (same loss, training "
            "and seeds). End to end: the runs' total seconds, iteration 0 included. Predicted: T1 / (T1 - G1 + G_rho) "
            "from the measured phase times (G: generation + reward seconds per iteration). Amdahl: "
            "1 / (1 - g + g rho), g = generation share of the rho = 1 runs' time (the last column lets g include "
            "reward time); both are predictions, not bounds: shorter answers can beat them.", "",
            "| setting | seeds | s/iteration | rho=1 s/iteration | speed-up | per-seed speed-up | end to end | "
            "predicted | g | Amdahl | g (gen+reward) | Amdahl (gen+reward) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rep.speedup:
        out.append(f"| {r['setting']} | {', '.join(map(str, r['seeds']))} | {_cell(r['time_per_iteration_s'])} | "
                   f"{_cell(r['reference_time_per_iteration_s'])} | {_f(r['speedup'])} | "
                   f"{_cell(r['speedup_per_seed'])} | {_f(r.get('speedup_end_to_end'))} | "
                   f"{_f(r.get('predicted_speedup'))} | {_f(r['generation_share'])} | {_f(r['amdahl_bound'])} | "
                   f"{_f(r['generation_reward_share'])} | {_f(r['amdahl_bound_generation_reward'])} |")
    out += _finals_table(rep)
    out += _paired_tables(rep)
    out += ["", "## Fig. 2: where the gain in ranking score comes from (rho = 1)", "",
            "Change of the mean ranking score max(r_a, r_b) from store t-1 to store t, split between the prompts "
            "ranked in the bottom 50 % at t-1 and the rest (each half's sum of changes / N). In control runs "
            "(no training) the gain is regression to the mean.", "",
            "| group | t | runs | bottom 50 % | top 50 % | total | bottom share |", "|---|---|---|---|---|---|---|"]
    for r in rep.fig2["summary"]:
        out.append(f"| {r['group']} | {r['iteration']} | {r['n']} | {_f(r['bottom'])} | {_f(r['top'])} | "
                   f"{_f(r['total'])} | {_f(r['share_bottom'])} |")
    if rep.fig2["attribution"]:
        out += ["", "Attributable to training (trained minus control, mean over seeds):", "",
                "| group | t | bottom: trained | bottom: control | bottom from training | total from training | "
                "bottom share of the training gain | bottom gain that is regression |",
                "|---|---|---|---|---|---|---|---|"]
        for a in rep.fig2["attribution"]:
            out.append(f"| {a['group']} | {a['iteration']} | {_f(a['bottom_trained'])} | {_f(a['bottom_control'])} | "
                       f"{_f(a['bottom_from_training'])} | {_f(a['total_from_training'])} | "
                       f"{_f(a['share_bottom_of_training_gain'])} | {_f(a['bottom_regression_fraction'])} |")
        out.append("")
        for a in rep.fig2["attribution"]:
            out.append(f"- {a['group']}, t={a['iteration']}: the bottom half gained {_f(a['bottom_trained'])}, of "
                       f"which {_f(a['bottom_control'])} (fraction {_f(a['bottom_regression_fraction'])}) is "
                       f"regression to the mean and {_f(a['bottom_from_training'])} comes from training; the bottom "
                       f"half carries a fraction {_f(a['share_bottom_of_training_gain'])} of the gain from training "
                       f"({_f(a['total_from_training'])}).")
    if rep.fig2.get("contrast"):
        out += ["", "Mean gain of a bottom-half prompt minus that of a top-half prompt, trained minus control, "
                "paired by seed (95 % bootstrap interval over seeds):", "",
                "| group | t | seeds | difference | 95 % CI |", "|---|---|---|---|---|"]
        out += [f"| {c['group']} | {c['iteration']} | {c['seeds']} | {_f(c['mean'])} | "
                + (f"[{_f(c['ci95'][0])}, {_f(c['ci95'][1])}] |" if c["ci95"] else "(one seed) |")
                for c in rep.fig2["contrast"]]
    if rep.figures:
        out += ["", "## Figures", ""] + [f"![{name}]({name})" for name in rep.figures]
    if rep.notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in rep.notes]
    return "\n".join(out) + "\n"


def _finals_table(rep: Report) -> list[str]:
    """The seed-to-seed spread at the last iteration every run of a setting reached."""
    rows = [(label, f) for label, f in rep.finals.items() if f]
    if not rows:
        return []
    out = ["", "## Seed-to-seed spread at the last iteration (mean, sample SD over seeds)", "",
           "| setting | t | seeds | accuracy mean | accuracy SD | gold reward mean | gold reward SD |",
           "|---|---|---|---|---|---|---|"]
    for label, f in rows:
        acc, rew = f.get("eval_accuracy", {}), f.get("eval_reward_mean", {})
        t = (acc or rew)["iteration"]
        out.append(f"| {label} | {t} | {(acc or rew)['n']} | {_f(acc.get('mean'))} | {_f(acc.get('sd'))} | "
                   f"{_f(rew.get('mean'))} | {_f(rew.get('sd'))} |")
    return out


def _paired_tables(rep: Report) -> list[str]:
    if not rep.paired:
        return []
    out = ["", f"## Paired comparisons (per prompt, paired by seed; margin {rep.margin:g})", "",
           "Setting B against its baseline A: mean of B - A over seeds and prompts, its 95 % interval (hierarchical "
           "bootstrap: seeds, then prompts within a seed), the seeds where B was ahead / behind, and the outcome: "
           "equivalent (the 90 % interval inside +-margin: TOST at 5 %), better / worse (the 95 % interval "
           "excludes 0), else undecided, and always undecided with fewer than five seeds. Views: after the last "
           "common iteration, at equal generated tokens, at equal modelled time (phase rates shared by all runs), "
           "and the area under the curve over iterations. Seeds to decide: an undecided comparison's estimate of "
           "the seeds that would decide it if its mean stayed.",
           "", "| B | vs A | endpoint | view | outcome | B - A | 95 % CI | seeds +/- | seeds to decide |",
           "|---|---|---|---|---|---|---|---|---|"]
    for p in rep.paired:
        for view, c in p["views"].items():
            out.append(f"| {p['setting']} | {p['baseline']} | {p['endpoint_name']} | {view} | **{c['outcome']}** | "
                       f"{_f(c['mean'])} | [{_f(c['ci95'][0])}, {_f(c['ci95'][1])}] | "
                       f"{c['positive_seeds']}/{c['negative_seeds']} | {_f(c.get('seeds_to_decide'))} |")
    return out


# --------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


CURVE_FIGURES = {("eval_accuracy", "iteration"): "accuracy_vs_iteration.png",
                 ("eval_accuracy", "cumulative_tokens"): "accuracy_vs_tokens.png",
                 ("eval_accuracy", "cumulative_time_s"): "accuracy_vs_time.png",
                 ("eval_reward_mean", "iteration"): "vs_iteration.png",
                 ("eval_reward_mean", "cumulative_tokens"): "vs_tokens.png",
                 ("eval_reward_mean", "cumulative_time_s"): "vs_time.png",
                 ("eval_win_score", "iteration"): "win_vs_iteration.png"}
"""(metric, x axis) -> the file of its comparison figure."""
X_LABELS = {"iteration": "iteration", "cumulative_tokens": "cumulative generated tokens",
            "cumulative_time_s": "cumulative wall-clock seconds"}
METRIC_TITLES = {"eval_accuracy": "held-out exact accuracy", "eval_reward_mean": "held-out gold reward",
                 "eval_win_score": "win score vs the starting policy"}
PAIRED_MARKS = {("eval_accuracy", "iteration"): ("success", "iterations"),
                ("eval_accuracy", "cumulative_tokens"): ("success", "tokens"),
                ("eval_reward_mean", "iteration"): ("gold_reward", "iterations"),
                ("eval_reward_mean", "cumulative_tokens"): ("gold_reward", "tokens")}
"""(metric, x axis) -> (endpoint, view) of the paired comparison drawn on its figure (the time axes show
measured seconds, the paired time view models them: no mark there)."""
CI_LABEL = "paired 95 % CI of the difference, placed on the baseline's mean"


def comparisons(settings: list[dict]) -> list[tuple[str, str]]:
    """(setting, baseline) labels, one per panel: each setting against the run setting that differs from it in
    one factor only, the first of: training (a no-training control against the same setting trained), the
    samples per regenerated prompt (n against the paper's 2 at the same rho), the loss (against the default
    loss, wDPO), the selection (random against the default, lowest-reward, at the same rho), rho (against
    rho = 1 with the same loss, training and n). The rho = 1 default is everyone's baseline and has no panel of
    its own; nor has a setting whose baselines were not run. A setting with n != 2 at rho < 1 also faces
    rho = 1 with n = 2 (n rho N samples against 2 N: more samples per prompt against more prompts).
    (Reports written before num_samples have n = 2.)"""
    default = OptuneNemoConfig()
    n2 = DEFAULT_SAMPLES
    by_key = {(s["rho"], s["selection"], s["loss"], s["trained"], s.get("num_samples", n2)): s["label"]
              for s in settings}

    def rho_one(loss, trained, n):
        return next((label for (rho, _, lo, tr, nn), label in sorted(by_key.items()) if rho == 1.0 and lo == loss
                     and tr == trained and nn == n), None)

    out = []
    for s in settings:
        rho, sel, loss, trained, n = s["rho"], s["selection"], s["loss"], s["trained"], s.get("num_samples", n2)
        candidates = [by_key.get((rho, sel, loss, True, n)) if not trained else None,
                      by_key.get((rho, sel, loss, trained, n2)) if n != n2 else None,
                      by_key.get((rho, sel, default.loss.name, trained, n)) if loss != default.loss.name else None,
                      by_key.get((rho, default.optune.selection, loss, trained, n))
                      if sel not in (default.optune.selection, "all") else None,
                      rho_one(loss, trained, n) if rho != 1.0 else None]
        base = next((c for c in candidates if c is not None), None)
        if base is not None:
            out.append((s["label"], base))
        same_samples = rho_one(loss, trained, n2) if n != n2 and rho != 1.0 else None
        if same_samples is not None and same_samples != base:
            out.append((s["label"], same_samples))   # n samples of rho N prompts against 2 of all N
    return out


def comparison_panel(ax, setting: list[dict], baseline: list[dict], *, x: str = "iteration",
                     start: float | None = None, ci: dict | None = None) -> None:
    """One comparison on `ax`: the setting (colour C0) and its baseline (grey), each its mean over seeds as a
    line and its seed range [min, max] as a band (points of `curve`: iteration, mean, min, max and the cost
    axes). `start`: the starting policy's value, drawn as a dashed line (and at the tick `start` on an
    iteration axis). `ci`: an optional confidence band for the setting, {"x": [...], "lo": [...], "hi": [...],
    "label": "..."}, drawn hatched."""
    for pts, colour, z in ((baseline, "0.45", 2), (setting, "C0", 3)):
        xs = [p["iteration"] if x == "iteration" else p[x]["mean"] for p in pts]
        ax.plot(xs, [p["mean"] for p in pts], "o-", color=colour, ms=3, lw=1.5, zorder=z)
        ax.fill_between(xs, [p["min"] for p in pts], [p["max"] for p in pts], color=colour, alpha=0.2, lw=0,
                        zorder=z - 1)
    if ci is not None and len(ci["x"]) == 1:        # one comparison point: an interval bar
        mid = (ci["lo"][0] + ci["hi"][0]) / 2
        ax.errorbar(ci["x"], [mid], yerr=[[mid - ci["lo"][0]], [ci["hi"][0] - mid]], fmt="none", ecolor="C3",
                    elinewidth=1.6, capsize=4, zorder=6)
    elif ci is not None:
        ax.fill_between(ci["x"], ci["lo"], ci["hi"], facecolor="none", edgecolor="C0", hatch="///", lw=0, zorder=4)
    if start is not None:
        ax.axhline(start, color="k", ls="--", lw=0.8, zorder=1)
    ax.grid(alpha=0.3)


def comparison_figure(rep: Report, key: str, x: str, *, cis: dict | None = None):
    """A grid with one `comparison_panel` per `comparisons` pair (shared axes), for `key` against `x`; the
    legend below the panels. `cis`: {(setting, baseline): ci} passed on to the panels. None when no
    comparison has points."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from optune_nemo.evaluation.heldout import iteration_ticks

    pairs = [(a, b) for a, b in comparisons(rep.settings) if rep.curves[a][key] and rep.curves[b][key]]
    if not pairs:
        return None
    plt = _plt()
    ncols = min(4, len(pairs))
    nrows = math.ceil(len(pairs) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols, 2.9 * nrows + 0.9), sharex=True, sharey=True,
                             squeeze=False, layout="constrained")
    start = {"eval_reward_mean": rep.baseline.get("mean"), "eval_win_score": 50.0}.get(key)
    on_start = x == "iteration" and start is not None
    for ax, (a, b) in zip(axes.flat, pairs):
        comparison_panel(ax, rep.curves[a][key], rep.curves[b][key], x=x, start=start, ci=(cis or {}).get((a, b)))
        ax.set_title(f"{a}\nvs {b}", fontsize=8)
    for i in range(len(pairs), nrows * ncols):
        axes.flat[i].set_visible(False)
        above = axes.flat[i - ncols]          # the lowest panel of a column that is short of the last row
        above.xaxis.set_tick_params(labelbottom=True)
        above.set_xlabel(X_LABELS[x])
    its = [p["iteration"] for a, b in pairs for label in (a, b) for p in rep.curves[label][key]]
    if x == "iteration":
        ticks, labels = iteration_ticks(min(its), max(its), start=on_start)
        axes.flat[0].set_xticks(ticks, labels)
        if on_start:
            for ax in axes.flat[:len(pairs)]:
                ax.plot([ticks[0]], [start], "k^", ms=5, zorder=5)
    for ax in axes[-1][:len(pairs) - (nrows - 1) * ncols]:
        ax.set_xlabel(X_LABELS[x])
    for row in axes:
        row[0].set_ylabel(METRIC_TITLES[key])
    handles = [Line2D([], [], color="C0", marker="o", ms=3, label="the panel's setting: mean over seeds"),
               Line2D([], [], color="0.45", marker="o", ms=3, label="its baseline: mean over seeds"),
               Patch(color="0.6", alpha=0.4, label="band: seed range [min, max]")]
    if start is not None:
        handles.append(Line2D([], [], color="k", ls="--", lw=0.8, marker="^" if on_start else None, ms=5,
                              label="starting policy"))
    if cis:
        first = next(iter(cis.values()))
        handles.append(Line2D([], [], color="C3", marker="|", ms=8, lw=0, label=first.get("label", "CI"))
                       if len(first["x"]) == 1 else
                       Patch(facecolor="none", edgecolor="C0", hatch="///", label=first.get("label", "CI")))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False)
    fig.suptitle(f"{METRIC_TITLES[key]}: each setting against its baseline", fontsize=10)
    return fig


def paired_marks(rep: Report, key: str, x: str) -> dict:
    """{(setting, baseline): ci} for `comparison_panel`: each pair's paired 95 % interval of B - A (its
    PAIRED_MARKS view) added to the baseline's mean curve where the comparison was made (interpolated on a
    cost axis): where the setting stands against its baseline, seeds and prompts paired."""
    import numpy as np

    endpoint, view = PAIRED_MARKS.get((key, x), (None, None))
    out = {}
    for p in rep.paired:
        c = p["views"].get(view) if p["endpoint"] == endpoint else None
        pts = rep.curves.get(p["baseline"], {}).get(key) or []
        if not c or c.get("at") is None or not pts:
            continue
        xs = [pt["iteration"] if x == "iteration" else pt[x]["mean"] for pt in pts]
        base = float(np.interp(c["at"], xs, [pt["mean"] for pt in pts]))
        out[(p["setting"], p["baseline"])] = {"x": [c["at"]], "lo": [base + c["ci95"][0]],
                                              "hi": [base + c["ci95"][1]], "label": CI_LABEL}
    return out


def plot_curves(rep: Report, out_dir: Path, key: str, x: str) -> str | None:
    """`comparison_figure` of `key` against `x` (iteration, cumulative_tokens or cumulative_time_s), saved as
    its CURVE_FIGURES name; with the paired interval of PAIRED_MARKS where the report has it."""
    fig = comparison_figure(rep, key, x, cis=paired_marks(rep, key, x))
    if fig is None:
        return None
    name = CURVE_FIGURES[(key, x)]
    fig.savefig(out_dir / name, dpi=110)
    _plt().close(fig)
    return name


def plot_speedup(rep: Report, out_dir: Path) -> str | None:
    rows = [r for r in rep.speedup if r["rho"] != 1.0]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows)), 4.4), layout="constrained")
    xs = range(len(rows))
    ax.bar([i - 0.2 for i in xs], [r["speedup"] for r in rows], 0.4, label="measured")
    ax.bar([i + 0.2 for i in xs], [r["amdahl_bound"] or 0 for r in rows], 0.4, label="Amdahl bound (generation)")
    ax.set_xticks(list(xs), [r["setting"] for r in rows], rotation=20, ha="right", fontsize=7)
    ax.axhline(1, color="k", lw=0.8)
    ax.set_ylabel("speed-up per iteration over rho = 1")
    fig.legend(loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    fig.savefig(out_dir / "speedup.png", dpi=110)
    plt.close(fig)
    return "speedup.png"


def plot_gain_split(rep: Report, out_dir: Path) -> str | None:
    rows = rep.fig2["summary"]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(rows)), 4.4), layout="constrained")
    xs = list(range(len(rows)))
    ax.bar([i - 0.2 for i in xs], [r["bottom"] for r in rows], 0.4, label="bottom 50 % at t-1")
    ax.bar([i + 0.2 for i in xs], [r["top"] for r in rows], 0.4, label="top 50 % at t-1")
    ax.plot(xs, [r["total"] for r in rows], "k_", ms=18, mew=2, label="total")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(xs, [f"{r['group']}\nt={r['iteration']}" for r in rows], fontsize=7)
    ax.set_ylabel("change of the mean ranking score")
    fig.legend(loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    fig.savefig(out_dir / "gain_split.png", dpi=110)
    plt.close(fig)
    return "gain_split.png"


def write_report(runs: list[Run] | None, out_dir: str | Path, *, margin: float = 0.05,
                 recorded: Report | None = None) -> Report:
    """report.md, report.json and the figures in out_dir, from run directories or from a `recorded` report
    (its report.json: the figures and the Markdown are drawn again from the recorded numbers)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rep = recorded if recorded is not None else analyse(runs, margin=margin)
    rep.figures = []
    for name in (*(plot_curves(rep, out_dir, key, x) for key, x in CURVE_FIGURES), plot_speedup(rep, out_dir),
                 plot_gain_split(rep, out_dir)):
        if name:
            rep.figures.append(name)
    write_text_atomic(out_dir / "report.md", render_markdown(rep))
    write_json_atomic(out_dir / "report.json", rep.to_json())
    return rep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optune_nemo.report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", help="run directories, or directories holding run directories")
    parser.add_argument("--from-json", default=None,
                        help="draw the figures and report.md again from a recorded report.json (no run directories)")
    parser.add_argument("--out", required=True, help="output directory for report.md, report.json and figures")
    parser.add_argument("--margin", type=float, default=0.05,
                        help="equivalence margin of the paired comparisons, in the endpoint's units (default 0.05)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.from_json:
            rep = write_report(None, args.out, recorded=read_report(args.from_json))
            log.info("report: %s (drawn again from %s)", Path(args.out) / "report.md", args.from_json)
            return 0
        if not args.runs:
            raise ConfigError("give run directories, or --from-json REPORT_JSON")
        runs = find_runs(args.runs)
        if not runs:
            raise ConfigError(f"{' '.join(args.runs)}: no run directory (config.yaml) found")
        rep = write_report(runs, args.out, margin=args.margin)
    except ConfigError as e:
        print(f"optune_nemo.analysis.report: error: {e}", file=sys.stderr)
        return 2
    log.info("report: %s (%d runs, %d settings)", Path(args.out) / "report.md", len(rep.runs), len(rep.settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
