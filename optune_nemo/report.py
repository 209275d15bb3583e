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

from optune_nemo.algorithm.selection import select_lowest
from optune_nemo.config import ConfigError, OptuneNemoConfig, config_from_yaml, num_regenerated
from optune_nemo.fileio import write_json_atomic, write_text_atomic

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

    @property
    def label(self) -> str:
        return f"rho={self.rho:g} {self.selection} {self.loss}" + ("" if self.trained else " no-training")


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
        return Setting(float(c.optune.rho), c.optune.selection, c.loss.name, c.train.epochs_per_iteration > 0)

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
    """{prompt_id: max(r_a, r_b)} of a stored rollout store, over prompts that have a pair."""
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


def speedups(groups: dict[Setting, list[Run]]) -> list[dict]:
    """Each setting against the rho = 1 runs of the same loss and training, over their common seeds."""
    out = []
    for s, runs in groups.items():
        refs = [r for ref_s, rr in groups.items() for r in rr
                if ref_s.rho == 1.0 and ref_s.loss == s.loss and ref_s.trained == s.trained]
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
        out.append({"setting": s.label, "rho": s.rho, "seeds": seeds, "time_per_iteration_s": t_mine,
                    "reference_time_per_iteration_s": t_ref, "speedup": t_ref["mean"] / t_mine["mean"],
                    "speedup_per_seed": spread(per_seed), "generation_share": g,
                    "amdahl_bound": amdahl_bound(g, s.rho) if g is not None else None,
                    "generation_reward_share": g_r,
                    "amdahl_bound_generation_reward": amdahl_bound(g_r, s.rho) if g_r is not None else None})
    return out


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
    """gain_split for every iteration t >= 1 of every rho = 1 run, averaged per (trained loss | control, t),
    and the part of the trained runs' gain beyond the control runs' (attributed to training)."""
    rows, missing = [], []
    for s, runs in groups.items():
        if s.rho != 1.0:
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
    return {"rows": rows, "summary": summary, "attribution": attribution, "missing_stores": missing}


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
    figures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in ("runs", "settings", "baseline", "curves", "speedup", "fig2", "figures",
                                              "notes")}


def analyse(runs: list[Run]) -> Report:
    """All numbers of the report (no files written)."""
    groups = group_settings(runs)
    rep = Report()
    sources = fork_sources(runs)
    rep.runs = [{"path": str(r.path), "setting": r.setting.label, "seed": r.seed, "completed": r.completed,
                 "iterations": len(r.records), "forked_from": str(r.source_dir()) if r.fork else None,
                 "fork_source": r.path.resolve() in sources} for r in runs]
    for s, rs in groups.items():
        rep.settings.append({"label": s.label, "rho": s.rho, "selection": s.selection, "loss": s.loss,
                             "trained": s.trained, "seeds": [r.seed for r in rs], "runs": [str(r.path) for r in rs]})
        rep.curves[s.label] = {key: curve(rs, key) for key in ("eval_reward_mean", "eval_win_score")}
    rep.baseline = spread([_num(r.evals.get("baseline", {}).get("reward_mean")) for rs in groups.values() for r in rs])
    rep.speedup = speedups(groups)
    if not any(s.rho == 1.0 for s in groups):
        rep.notes.append("no rho = 1 runs: no speed-up and no Fig. 2 analysis")
    rep.fig2 = fig2_analysis(groups)
    if rep.fig2["missing_stores"]:
        rep.notes.append(f"Fig. 2: {len(rep.fig2['missing_stores'])} iteration(s) skipped, their rollout stores are "
                         "gone (checkpoint.keep_last?)")
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
    its = sorted({p["iteration"] for c in rep.curves.values() for p in c[key]})
    if not its:
        return ["(not evaluated in these runs)", ""]
    lines = ["| setting | " + " | ".join(f"t={t}" for t in its) + " |", "|---" * (len(its) + 1) + "|"]
    for label, c in rep.curves.items():
        by_t = {p["iteration"]: p for p in c[key]}
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
            "and seeds). Amdahl: 1 / (1 - g + g rho), g = generation share of the rho = 1 runs' time; the last "
            "column lets g include reward time, which also scales with rho.", "",
            "| setting | seeds | s/iteration | rho=1 s/iteration | speed-up | per-seed speed-up | g | Amdahl bound | "
            "g (gen+reward) | bound (gen+reward) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rep.speedup:
        out.append(f"| {r['setting']} | {', '.join(map(str, r['seeds']))} | {_cell(r['time_per_iteration_s'])} | "
                   f"{_cell(r['reference_time_per_iteration_s'])} | {_f(r['speedup'])} | "
                   f"{_cell(r['speedup_per_seed'])} | {_f(r['generation_share'])} | {_f(r['amdahl_bound'])} | "
                   f"{_f(r['generation_reward_share'])} | {_f(r['amdahl_bound_generation_reward'])} |")
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
    if rep.figures:
        out += ["", "## Figures", ""] + [f"![{name}]({name})" for name in rep.figures]
    if rep.notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in rep.notes]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(rep: Report, out_dir: Path, x: str) -> str | None:
    """Gold reward and win score against `x` (iteration, cumulative_tokens or cumulative_time_s): mean line,
    min-max band."""
    if not any(c[k] for c in rep.curves.values() for k in c):
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "eval_reward_mean", "held-out gold reward"),
                           (axes[1], "eval_win_score", "win score vs the starting policy")):
        for label, c in rep.curves.items():
            pts = c[key]
            if not pts:
                continue
            xs = [p["iteration"] if x == "iteration" else p[x]["mean"] for p in pts]
            line, = ax.plot(xs, [p["mean"] for p in pts], "o-", label=label, ms=3)
            ax.fill_between(xs, [p["min"] for p in pts], [p["max"] for p in pts], color=line.get_color(), alpha=0.15)
        if key == "eval_reward_mean" and rep.baseline.get("mean") is not None:
            ax.axhline(rep.baseline["mean"], color="k", ls="--", lw=0.8, label="starting policy")
        if key == "eval_win_score":
            ax.axhline(50, color="k", ls="--", lw=0.8)
        ax.set_title(title)
        ax.set_xlabel({"iteration": "iteration", "cumulative_tokens": "cumulative generated tokens",
                       "cumulative_time_s": "cumulative wall-clock seconds"}[x])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    name = {"iteration": "vs_iteration.png", "cumulative_tokens": "vs_tokens.png",
            "cumulative_time_s": "vs_time.png"}[x]
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    return name


def plot_speedup(rep: Report, out_dir: Path) -> str | None:
    rows = [r for r in rep.speedup if r["rho"] != 1.0]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows)), 4))
    xs = range(len(rows))
    ax.bar([i - 0.2 for i in xs], [r["speedup"] for r in rows], 0.4, label="measured")
    ax.bar([i + 0.2 for i in xs], [r["amdahl_bound"] or 0 for r in rows], 0.4, label="Amdahl bound (generation)")
    ax.set_xticks(list(xs), [r["setting"] for r in rows], rotation=20, ha="right", fontsize=7)
    ax.axhline(1, color="k", lw=0.8)
    ax.set_ylabel("speed-up per iteration over rho = 1")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "speedup.png", dpi=110)
    plt.close(fig)
    return "speedup.png"


def plot_gain_split(rep: Report, out_dir: Path) -> str | None:
    rows = rep.fig2["summary"]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(rows)), 4))
    xs = list(range(len(rows)))
    ax.bar([i - 0.2 for i in xs], [r["bottom"] for r in rows], 0.4, label="bottom 50 % at t-1")
    ax.bar([i + 0.2 for i in xs], [r["top"] for r in rows], 0.4, label="top 50 % at t-1")
    ax.plot(xs, [r["total"] for r in rows], "k_", ms=18, mew=2, label="total")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(xs, [f"{r['group']}\nt={r['iteration']}" for r in rows], fontsize=7)
    ax.set_ylabel("change of the mean ranking score")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "gain_split.png", dpi=110)
    plt.close(fig)
    return "gain_split.png"


def write_report(runs: list[Run], out_dir: str | Path) -> Report:
    """report.md, report.json and the figures in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rep = analyse(runs)
    for name in (plot_curves(rep, out_dir, "iteration"), plot_curves(rep, out_dir, "cumulative_tokens"),
                 plot_curves(rep, out_dir, "cumulative_time_s"), plot_speedup(rep, out_dir),
                 plot_gain_split(rep, out_dir)):
        if name:
            rep.figures.append(name)
    write_text_atomic(out_dir / "report.md", render_markdown(rep))
    write_json_atomic(out_dir / "report.json", rep.to_json())
    return rep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optune_nemo.report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories, or directories holding run directories")
    parser.add_argument("--out", required=True, help="output directory for report.md, report.json and figures")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        runs = find_runs(args.runs)
        if not runs:
            raise ConfigError(f"{' '.join(args.runs)}: no run directory (config.yaml) found")
        rep = write_report(runs, args.out)
    except ConfigError as e:
        print(f"optune_nemo.report: error: {e}", file=sys.stderr)
        return 2
    log.info("report: %s (%d runs, %d settings)", Path(args.out) / "report.md", len(rep.runs), len(rep.settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
