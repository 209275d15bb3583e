"""Render every measured figure in README.md and docs/*.md from the recorded data under docs/data/ and
docs/results/, between markers

    <!-- BEGIN generated:NAME (scripts/render_docs.py) -->
    ...
    <!-- END generated:NAME -->

    python scripts/render_docs.py           rewrite the blocks
    python scripts/render_docs.py --check   exit 1 when a block differs from what the data gives (a test runs it)
    python scripts/render_docs.py --root DIR   the same on a copy: DIR/README.md, DIR/docs/*.md and their data

Where the data come from (each directory names its machine in its JSON):
  docs/data/default_run/        `make run` on the embedded default: scripts/record_run.py
  docs/data/<machine>-<date>/   bench/*.py output (bench/gpu_session.sh on a lent GPU)
  docs/results/                 `python -m optune_nemo.report` of experiments/small_scale.sh
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from optune_nemo.analysis.stats import MIN_SEEDS

REPO = Path(__file__).resolve().parents[1]

DATA = REPO / "docs" / "data"
RESULTS = REPO / "docs" / "results"
BLOCK = re.compile(r"(<!-- BEGIN generated:(?P<name>[\w-]+) \(scripts/render_docs\.py\) -->\n)(?P<body>.*?)"
                   r"(<!-- END generated:(?P=name) -->)", re.S)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _f(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def machine(info: dict) -> str:
    """One phrase naming the machine of a recorded figure."""
    dev = info.get("device", "cpu")
    if dev == "cpu":
        return (f"{info.get('cpu', 'CPU')} ({info.get('cpus')} cores, {info.get('threads')} torch threads, no GPU), "
                f"torch {info.get('torch')}")
    return f"{dev}, torch {info.get('torch')} (CUDA {info.get('cuda')})"


# --------------------------------------------------------------------------- blocks


def default_run() -> str:
    d = DATA / "default_run"
    meta = json.loads((d / "run.json").read_text())
    records = _jsonl(d / "metrics.jsonl")
    ev = json.loads((d / "eval.json").read_text())
    base = ev["baseline"]
    last = ev["iterations"][max(ev["iterations"], key=int)]
    lines = [f"Recorded {meta['date']} with `{meta['command']}` on {machine(meta)}: "
             f"{meta['wall_s'] / 60:.1f} min wall clock (venv installed, the model already dequantised in its "
             "cache).", "",
             "| held-out, greedy | before | after |", "|---|---|---|",
             f"| exact-answer accuracy | {_f(base.get('accuracy'))} | {_f(last.get('accuracy'))} |",
             f"| mean gold reward | {_f(base['reward_mean'])} | {_f(last['reward_mean'])} |",
             f"| win score vs the starting policy (eq. 7) | 50 | {_f(last.get('win_score'), 1)} |",
             f"| mean answer length (tokens) | {_f(base.get('response_tokens_mean'), 1)} | "
             f"{_f(last.get('response_tokens_mean'), 1)} |",
             "", "| iteration | regenerated | generated tokens | generation s | reference s | train s | total s | "
             "store chosen reward | train pairs |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['iteration']} | {r['regenerated']} | {r['generated_tokens']} | "
                     f"{r['time_generation_s']:.1f} | {r['time_reference_s']:.1f} | {r['time_train_s']:.1f} | "
                     f"{r['time_total_s']:.1f} | {r['reward_chosen_mean']:.3f} | {r['train_pairs']} |")
    gen = sum(r["time_generation_s"] for r in records)
    tot = sum(r["time_total_s"] for r in records)
    lines += ["", f"The iterations took {tot:.0f} s of that wall clock (the rest: start-up, the held-out "
              f"evaluations, the export), generation {100 * gen / tot:.0f} % of them; precision "
              f"`{_config_value(d / 'config.yaml', 'precision')}`."]
    return "\n".join(lines)


def _config_value(path: Path, key: str) -> str:
    for line in path.read_text().splitlines():
        if line.startswith(f"{key}:"):
            return line.split(":", 1)[1].split("#")[0].strip().strip('"')
    return "?"


def iteration_table(it: dict) -> list[str]:
    """bench/iteration.py's phases per setting, its speed-up and Amdahl's bound."""
    r1, rr = it["rho_1"], it[f"rho_{it['rho']:g}"]
    lines = ["| setting | generation s | reward s | reference s | train s | total s | generation share | "
             "pairs trained | tokens per stored pair |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in (("rho = 1 (online DPO)", r1), (f"rho = {it['rho']:g}, lowest reward", rr)):
        lines.append(f"| {name} | {r['generation_s']:.2f} | {r['reward_s']:.3f} | {r['reference_s']:.2f} | "
                     f"{r['train_s']:.2f} | {r['total_s']:.2f} | {100 * r['generation_share']:.1f} % | "
                     f"{r['train_pairs']:g} | {_f(r.get('tokens_per_pair'), 1)} |")
    g = it["generation_share_rho_1"]
    lines += ["", f"Measured speed-up {it['speedup']:.2f}x against Amdahl's bound {it['amdahl_bound']:.2f}x "
              f"(1 / (1 - g + g rho) with g = {g:.3f}): {100 * it['speedup_over_bound']:.0f} % of the bound. "
              f"Generation at rho = {it['rho']:g} took {100 * rr['generation_s'] / r1['generation_s']:.0f} % of the "
              f"rho = 1 time for {100 * rr['generated_tokens'] / r1['generated_tokens']:.0f} % of its tokens "
              "(the bound assumes generation time scales with rho exactly)."]
    return lines


def cpu_iteration() -> str:
    it = json.loads((DATA / "dev-cpu" / "iteration.json").read_text())
    runs = it["rho_1"]["iterations"]
    return "\n".join([f"Machine: {machine(it)}. `bench/iteration.py --iterations {runs}` on the default "
                      "recipe (SmolLM2-135M-Instruct, 64 prompts, 24-token answers, precision auto), iterations "
                      "after a shared iteration 0, median over iterations:", "", *iteration_table(it)])


def gpu_h100() -> str:
    d = DATA / "h100-2026-11-23"
    train = _jsonl(d / "training.jsonl")
    it = json.loads((d / "iteration.json").read_text())
    lines = [f"Machine: {machine(train[0])}, {train[0]['cpus']} CPU cores, python {train[0]['python']}, "
             "megatron-core 0.16.1 with the `local` layer spec (no Transformer Engine or Apex in that image). "
             "Raw output: `docs/data/h100-2026-11-23/`.", "",
             "**Training** (`bench/training.py`, one preference-pair optimizer step = forward + backward of the "
             "packed pairs; MFU from megatron's FLOP formula against "
             f"{train[0]['peak_tflops']:.0f} TFLOP/s dense bf16):", "",
             "| preset | params | precision | pairs/step | prompt + response tokens | micro-batch | median step s | "
             "tokens/s | model TFLOP/s | model MFU | executed MFU |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in train:
        lines.append(f"| {r['preset']} | {r['params'] / 1e6:.0f} M | {r['precision']} | {r['pairs_per_step']} | "
                     f"{r['prompt_tokens']} + 2 x {r['response_tokens']} | {r['micro_batch_size']} | "
                     f"{r['median_step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['model_tflops_per_s']:.1f} | "
                     f"{100 * r['mfu']:.1f} % | {100 * r['executed_mfu']:.1f} % |")
    lines += ["", f"**One OPTune iteration** (`bench/iteration.py`, SmolLM2-135M-Instruct, "
              f"{', '.join('`' + o + '`' for o in it['overrides'][1:3])}, 64 prompts, iterations after a shared "
              "iteration 0, median over iterations):", "", *iteration_table(it)]
    return "\n".join(lines)


def cpu_generation() -> str:
    path = DATA / "dev-cpu" / "generation.json"
    rows = json.loads(path.read_text())
    r0 = rows[0]
    lines = [f"Machine: {machine(r0)}, python {r0['python']}. "
             f"`bench/generation.py --reps {r0['reps']}`: SmolLM2-135M-Instruct, {r0['n']} samples per prompt, "
             f"{r0['max_new_tokens']} new tokens, temperature {r0['temperature']}, top_p {r0['top_p']}; greedy answers "
             "(24 tokens) compared first. Tokens/s are medians over the repetitions.", "",
             "| dtype | prompts | engine tok/s | transformers tok/s | ratio | greedy equal | "
             "matmul share of engine time | ratio with only the matmuls left (ratio / share) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        share = r.get("matmul_share")
        lines.append(f"| {r['dtype']} | {r['prompts']} | {r['engine_tokens_per_s']:.1f} | {r['hf_tokens_per_s']:.1f} | "
                     f"{r['ratio']:.2f} | {r['greedy_equal']} | {_f(share, 2)} | "
                     f"{_f(r['ratio'] / share if share else None, 2)} |")
    return "\n".join(lines)


def cpu_generation_compile() -> str:
    rows = json.loads((DATA / "dev-cpu" / "generation_compile.json").read_text())
    eager = {(r["dtype"], r["prompts"]): r for r in json.loads((DATA / "dev-cpu" / "generation.json").read_text())}
    lines = [f"`bench/generation.py --compile --reps {rows[0]['reps']}` (same machine, a separate run; each ratio is "
             "against `transformers` measured in its own run):", "",
             "| dtype | prompts | engine tok/s, compiled | ratio, compiled | ratio, eager (table above) | "
             "greedy equal, compiled | warm-up s, compiled (eager) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        e = eager.get((r["dtype"], r["prompts"]), {})
        lines.append(f"| {r['dtype']} | {r['prompts']} | {r['engine_tokens_per_s']:.1f} | {r['ratio']:.2f} | "
                     f"{_f(e.get('ratio'), 2)} | {r['greedy_equal']} | {r['engine_warmup_s']:.1f} "
                     f"({_f(e.get('engine_warmup_s'), 1)}) |")
    return "\n".join(lines)


def _final(curves: dict, label: str, key: str = "eval_reward_mean") -> dict | None:
    pts = curves.get(label, {}).get(key) or []
    return pts[-1] if pts else None


def _label(rep: dict, rho: float, selection: str, loss: str = "wdpo", trained: bool = True,
           num_samples: int = 2) -> str | None:
    for s in rep["settings"]:
        if (abs(s["rho"] - rho) < 1e-9 and s["selection"] == selection and s["loss"] == loss
                and s["trained"] == trained and s.get("num_samples", 2) == num_samples):
            return s["label"]
    return None


PRIMARY = ("success", "gold_reward")
"""Endpoints of the paired comparisons in order of preference: exact accuracy, else the gold reward."""
FLIP = {"better": "worse", "worse": "better", "equivalent": "equivalent", "undecided": "undecided"}


def _paired(rep: dict, a: str | None, b: str | None, endpoint: str) -> dict | None:
    """The report's comparison of a against b on `endpoint` as {view: (outcome, mean, ci95, seeds,
    seeds_to_decide, seeds where a is ahead)} from a's side (the report stores each setting against its
    baseline: flipped when a is the baseline), plus "name": the endpoint's name; None when the report has
    none."""
    for p in rep.get("paired", []):
        if p["endpoint"] != endpoint or {p["setting"], p["baseline"]} != {a, b}:
            continue
        flip = p["setting"] != a
        out = {"name": p["endpoint_name"]}
        for view, c in p["views"].items():
            lo, hi = c["ci95"]
            mean, lo, hi = (-c["mean"], -hi, -lo) if flip else (c["mean"], lo, hi)
            ahead = c["negative_seeds"] if flip else c["positive_seeds"]
            out[view] = (FLIP[c["outcome"]] if flip else c["outcome"], mean, (lo, hi), c["seeds"],
                         c.get("seeds_to_decide"), ahead)
        return out
    return None


def _view_text(v: tuple, *, signs: bool = False) -> str:
    outcome, mean, (lo, hi), seeds, more, ahead = v
    return (f"{outcome} ({mean:+.3f} [{lo:+.3f}, {hi:+.3f}]" + (f"; a ahead in {ahead} of {seeds}" if signs else "")
            + (f"; ~{more} seeds to decide)" if more else ")"))


def _paired_verdict(rep: dict, a: str, b: str) -> str | None:
    """The report's paired outcome of a against b on the primary endpoint, view by view; None without one."""
    for endpoint in PRIMARY:
        p = _paired(rep, a, b, endpoint)
        if p is not None:
            views = {k: v for k, v in p.items() if k != "name"}
            return f"{p['name']}, paired over {next(iter(views.values()))[3]} seeds: " + \
                "; ".join(f"{view}: {_view_text(v)}" for view, v in views.items())
    return None


NO_PAIRED = ("undecided: this recording has no per-prompt records, so no paired test is possible (the seed "
             "ranges are a description, not a test)")


def _compare(rep: dict, a: str | None, b: str | None, key: str) -> tuple[str, str]:
    """(cell text, verdict) for setting a against b: the means with seed ranges at the last iteration (a
    description), and the verdict of the report's paired statistics (equivalent / better / worse /
    undecided per view), or NO_PAIRED when the recorded experiment has none."""
    if a is None or b is None:
        return "not run", "not measured"
    fa, fb = _final(rep["curves"], a, key), _final(rep["curves"], b, key)
    if fa is None or fb is None or fa["mean"] is None or fb["mean"] is None:
        return "no data", "not measured"
    diff = fa["mean"] - fb["mean"]
    text = (f"{fa['mean']:.3f} [{fa['min']:.3f}, {fa['max']:.3f}] vs {fb['mean']:.3f} [{fb['min']:.3f}, "
            f"{fb['max']:.3f}], difference {diff:+.3f} (n = {fa['n']}, {fb['n']})")
    return text, _paired_verdict(rep, a, b) or NO_PAIRED


def _claim_rows(rep: dict) -> list[tuple[str, str | None, str | None]]:
    return [
        ("same quality for less generation: rho 0.5 (a) vs rho 1 (b)", _label(rep, 0.5, "lowest_reward"),
         _label(rep, 1.0, "all")),
        ("same quality for less generation: rho 0.3 (a) vs rho 1 (b)", _label(rep, 0.3, "lowest_reward"),
         _label(rep, 1.0, "all")),
        ("lowest-reward (a) beats random (b) selection, rho 0.5", _label(rep, 0.5, "lowest_reward"),
         _label(rep, 0.5, "random")),
        ("lowest-reward (a) beats random (b) selection, rho 0.7", _label(rep, 0.7, "lowest_reward"),
         _label(rep, 0.7, "random")),
        ("wDPO (a) learns faster than DPO (b), rho 0.5", _label(rep, 0.5, "lowest_reward"),
         _label(rep, 0.5, "lowest_reward", loss="dpo")),
        ("training (a) beats the no-training control (b), rho 1", _label(rep, 1.0, "all"),
         _label(rep, 1.0, "all", trained=False)),
    ]


def _summary(rep: dict) -> str:
    """One mechanical sentence: how many of the paper's claims the paired statistics decide, and the best
    setting by mean."""
    paper = _claim_rows(rep)[:5]
    verdicts = [_compare(rep, a, b, "eval_reward_mean")[1] for _, a, b in paper]
    measured = [v for v in verdicts if v != "not measured"]
    decided = [v for v in measured if v != NO_PAIRED]
    finals = {s["label"]: _final(rep["curves"], s["label"]) for s in rep["settings"]}
    best = max((k for k in finals if finals[k] and finals[k]["mean"] is not None), key=lambda k: finals[k]["mean"])
    head = (f"{len(decided)} of the paper's {len(measured)} measured claims have a paired test in this recording"
            + (": the verdicts below are the report's" if decided else
               ": it predates per-prompt records, so none is decided (its three unpaired seeds could not have "
               "decided them; docs/evaluation.md, 'Paired comparisons', says what can)"))
    return (f"{head}; the highest mean held-out gold reward after the last iteration is {best}'s "
            f"({finals[best]['mean']:.3f}).")


def results_claims() -> str:
    rep = json.loads((RESULTS / "report.json").read_text())
    rows = _claim_rows(rep)
    lines = [_summary(rep), "",
             "Held-out gold reward at the last iteration, mean [min, max] over seeds (a description); the verdict is "
             "the report's paired test where it has one (rendered by scripts/render_docs.py from "
             "docs/results/report.json).", "",
             "| claim | held-out gold reward, a vs b | verdict |", "|---|---|---|"]
    for claim, a, b in rows:
        text, verdict = _compare(rep, a, b, "eval_reward_mean")
        lines.append(f"| {claim} | {text} | {verdict} |")
    lines += ["", "| setting | speed-up vs rho = 1 | Amdahl prediction (generation share g) | mean s per iteration |",
              "|---|---|---|---|"]
    for s in rep["speedup"]:
        if s["rho"] == 1.0:
            continue
        per_seed = s["speedup_per_seed"]
        lines.append(f"| {s['setting']} | {s['speedup']:.2f}x (per seed {per_seed['min']:.2f}-{per_seed['max']:.2f}) | "
                     f"{s['amdahl_bound']:.2f}x (g = {s['generation_share']:.2f}) | "
                     f"{s['time_per_iteration_s']['mean']:.1f} |")
    return "\n".join(lines)


DECISIVE_CLAIMS = [
    ("rho 0.5 keeps rho 1's quality (paper)", dict(rho=0.5, selection="lowest_reward"), dict(rho=1.0, selection="all")),
    ("rho 0.3 keeps rho 1's quality (paper)", dict(rho=0.3, selection="lowest_reward"), dict(rho=1.0, selection="all")),
    ("lowest-reward beats random, rho 0.5 (paper)", dict(rho=0.5, selection="lowest_reward"),
     dict(rho=0.5, selection="random")),
    ("wDPO learns faster than DPO, rho 0.5 (paper; AUC is its endpoint)", dict(rho=0.5, selection="lowest_reward"),
     dict(rho=0.5, selection="lowest_reward", loss="dpo")),
    ("smallest_gap against lowest-reward, rho 0.5 (challenger)", dict(rho=0.5, selection="smallest_gap"),
     dict(rho=0.5, selection="lowest_reward")),
    ("oldest against lowest-reward, rho 0.5 (challenger)", dict(rho=0.5, selection="oldest"),
     dict(rho=0.5, selection="lowest_reward")),
    ("training beats the no-training control, rho 1", dict(rho=1.0, selection="all"),
     dict(rho=1.0, selection="all", trained=False)),
    ("n = 4 against n = 2 samples per prompt, rho 1", dict(rho=1.0, selection="all", num_samples=4),
     dict(rho=1.0, selection="all")),
    ("n = 4 against n = 2 samples per prompt, rho 0.5", dict(rho=0.5, selection="lowest_reward", num_samples=4),
     dict(rho=0.5, selection="lowest_reward")),
    ("n = 4 at rho 0.5 against n = 2 at rho 1 (as many samples per iteration)",
     dict(rho=0.5, selection="lowest_reward", num_samples=4), dict(rho=1.0, selection="all")),
]
"""(claim, a, b): the decisive experiment's comparisons, a against b (`_label`'s arguments)."""
VIEW_ORDER = ("iterations", "tokens", "time", "auc")


def _decisive() -> dict:
    return json.loads((RESULTS / "decisive" / "report" / "report.json").read_text())


def _decisive_seeds(rep: dict) -> list[int]:
    """The seeds with a completed rho = 1 run (every other setting of a seed forks beside it)."""
    full = _label(rep, 1.0, "all")
    return sorted({r["seed"] for r in rep["runs"] if r["setting"] == full and r["completed"]})


def _claims_table(rep: dict, endpoint: str) -> list[str]:
    lines = ["| claim: a against b | seeds | " + " | ".join(VIEW_ORDER) + " |", "|---|---|" + "---|" * len(VIEW_ORDER)]
    for claim, a, b in DECISIVE_CLAIMS:
        p = _paired(rep, _label(rep, **a), _label(rep, **b), endpoint)
        if p is None:
            lines.append(f"| {claim} | – | " + " | ".join("not run" for _ in VIEW_ORDER) + " |")
            continue
        seeds = next(v[3] for k, v in p.items() if k != "name")
        lines.append(f"| {claim} | {seeds} | " + " | ".join(_view_text(p[v], signs=True) if v in p else "–"
                                                             for v in VIEW_ORDER) + " |")
    return lines


PRECISION = 0.1
"""The 95 % half-width at which an undecided comparison counts as measured: its interval is then narrow
enough to state, together with the seeds that would decide it (docs/evaluation.md, 'Paired comparisons')."""


def _half_width(v: tuple) -> float:
    lo, hi = v[2]
    return (hi - lo) / 2


def _outcome_text(view: str, v: tuple) -> str:
    """One view's outcome in a sentence with its mean difference a - b and the seeds where a was ahead; an
    undecided one adds its 95 % half-width and the seeds that would decide it."""
    seeds = f"{v[5]} of {v[3]} seeds"
    if v[0] != "undecided":
        return f"{v[0]} ({view}: {v[1]:+.3f}, {seeds})"
    more = f", ~{v[4]} seeds to decide" if v[4] else ""
    return f"undecided ({view}: {v[1]:+.3f} ± {_half_width(v):.3f}, {seeds}{more})"


def _unmeasured(rep: dict) -> list[str]:
    """The paper's claims' and the challengers' views on the primary endpoint that are neither decided nor
    measured to ±PRECISION (or not run at all)."""
    out = []
    for claim, a, b in DECISIVE_CLAIMS[:6]:
        p = _paired(rep, _label(rep, **a), _label(rep, **b), "success")
        if p is None:
            out.append(f"{claim}: not run")
            continue
        out += [f"{claim} ({v}, ±{_half_width(p[v]):.3f})" for v in VIEW_ORDER
                if v in p and p[v][0] == "undecided" and _half_width(p[v]) > PRECISION]
    return out


def _decisive_summary(rep: dict) -> str:
    """Mechanical sentences: the seeds recorded; per paper claim, its outcomes in the four views on the primary
    endpoint; which of the paper's and the challengers' views are neither decided nor measured to
    ±PRECISION."""
    seeds = _decisive_seeds(rep)
    parts = []
    for claim, a, b in DECISIVE_CLAIMS[:4]:
        p = _paired(rep, _label(rep, **a), _label(rep, **b), "success")
        if p is None:
            parts.append(f"{claim}: not run")
        else:
            parts.append(f"{claim}: " + ", ".join(_outcome_text(v, p[v]) for v in VIEW_ORDER if v in p))
    few = (f" With fewer than {MIN_SEEDS} paired seeds every outcome is undecided by rule (docs/evaluation.md, "
           "'Paired comparisons'); the intervals show where the means stand so far." if len(seeds) < MIN_SEEDS else "")
    open_ = _unmeasured(rep)
    precision = (f" Every view of the paper's claims and of the challengers is decided or measured to ±{PRECISION:g} "
                 "(95 % half-width)." if not open_ else
                 f" Neither decided nor measured to ±{PRECISION:g} (95 % half-width): " + "; ".join(open_) + ".")
    return (f"{len(seeds)} seeds recorded (seeds {', '.join(map(str, seeds)) or 'none'})." + few +
            " Held-out exact accuracy, paired by seed and prompt, margin "
            f"{rep['margin']:g}: " + "; ".join(parts) + "." + precision)


def results_decisive() -> str:
    rep = _decisive()
    lines = [_decisive_summary(rep), "",
             "Each cell: the outcome (equivalent / better / worse / undecided, for a against b), the mean paired "
             "difference a - b and its 95 % hierarchical bootstrap interval (seeds, then prompts), the seeds in "
             "which a was ahead (the sign count); an undecided cell adds the seeds that would decide it if the "
             "mean stayed where it is. Views: `iterations` after "
             "the last iteration, `tokens` at equal generated tokens, `time` at equal modelled time, `auc` the "
             "mean over iterations 0-5 (learns faster). Rendered by scripts/render_docs.py from "
             "docs/results/decisive/report/report.json.", "",
             "**Held-out exact accuracy** (the primary endpoint):", "", *_claims_table(rep, "success"), "",
             "**Held-out gold reward** (secondary; the training reward):", "", *_claims_table(rep, "gold_reward"), "",
             "| setting | speed-up per iteration over rho = 1, mean over seeds [95 % CI] | end to end, iteration 0 "
             "included | predicted T1 / (T1 - G1 + G_rho) | s per iteration |", "|---|---|---|---|---|"]
    for s in rep["speedup"]:
        if s["setting"] == _label(rep, 1.0, "all") or not s.get("speedup_per_seed"):
            continue
        ci = s.get("speedup_per_seed_ci95")
        per_seed = s["speedup_per_seed"]
        lines.append(f"| {s['setting']} | {per_seed['mean']:.3f}x " + (f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else
                                                                        "(one seed)")
                     + f" | {_f(s.get('speedup_end_to_end'))}x | {_f(s.get('predicted_speedup'))}x | "
                     f"{s['time_per_iteration_s']['mean']:.1f} |")
    contrast = [c for c in rep["fig2"].get("contrast", []) if c["group"] == "trained wdpo"]
    if contrast:
        lines += ["", "Fig. 2, well-conditioned: per iteration, the mean gain of a bottom-half prompt minus a "
                  "top-half prompt (ranked at t - 1) in the trained rho = 1 runs, minus the same in the no-training "
                  "control, paired by seed [95 % CI]:", "",
                  "| iteration | " + " | ".join(str(c["iteration"]) for c in contrast) + " |",
                  "|---|" + "---|" * len(contrast),
                  "| bottom minus top, trained minus control | " + " | ".join(
                      f"{c['mean']:+.3f} " + (f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]" if c["ci95"] else
                                              "(one seed)") + f" (n = {c['seeds']})"
                      for c in contrast) + " |"]
    return "\n".join(lines)


def results_report() -> str:
    """The report of the decisive experiment when it is recorded, else the first recording's."""
    where = RESULTS / "decisive" / "report"
    if not (where / "report.md").is_file():
        where = RESULTS
    body = (where / "report.md").read_text().strip()
    # the report's own figure links are relative to its directory
    rel = where.relative_to(RESULTS.parent).as_posix()
    body = re.sub(r"\]\((?!http)([\w.-]+\.png)\)", rf"]({rel}/\1)", body)
    body = re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + 2) + " ", body, flags=re.M)
    return body


def readme_headline() -> str:
    if (RESULTS / "decisive" / "report" / "report.json").is_file():
        return decisive_headline()
    rep = json.loads((RESULTS / "report.json").read_text())
    seeds = sorted({r["seed"] for r in rep["runs"] if not r["fork_source"]})
    sp = {s["setting"]: s for s in rep["speedup"]}
    a, b = _label(rep, 0.5, "lowest_reward"), _label(rep, 1.0, "all")
    text, verdict = _compare(rep, a, b, "eval_reward_mean")
    s = sp.get(a)
    speed = (f"{s['speedup']:.2f}x faster per iteration than rho = 1 (Amdahl prediction {s['amdahl_bound']:.2f}x "
             f"at the measured generation share {s['generation_share']:.2f})") if s else "speed-up not measured"
    rnd = _compare(rep, a, _label(rep, 0.5, "random"), "eval_reward_mean")
    dpo = _compare(rep, a, _label(rep, 0.5, "lowest_reward", loss="dpo"), "eval_reward_mean")
    return "\n".join([
        _summary(rep), "",
        f"Small-scale reproduction ([docs/results.md](docs/results.md); SmolLM2-135M-Instruct, built-in arithmetic "
        f"task, gold rule reward, {len(seeds)} seeds, iteration 0 + 3 OPTune iterations, 2-core CPU):",
        f"- OPTune at rho = 0.5 ran {speed}; held-out gold reward rho 0.5 vs rho 1: {text}: {verdict}.",
        f"- lowest-reward vs random selection at rho 0.5: {rnd[0]}: {rnd[1]}.",
        f"- wDPO vs DPO at rho 0.5: {dpo[0]}: {dpo[1]}."])


def decisive_headline() -> str:
    rep = _decisive()
    seeds = _decisive_seeds(rep)
    so_far = " so far" if len(seeds) < MIN_SEEDS else ""
    lines = [f"The decisive experiment{so_far} ([docs/results.md](docs/results.md#the-decisive-experiment); "
             f"SmolLM2-135M-Instruct, built-in arithmetic task, {len(seeds)} seeds, iteration 0 + 5 "
             "OPTune iterations, 256 held-out prompts, 2-core CPU), held-out exact accuracy, paired by seed and "
             f"prompt, equivalence margin {rep['margin']:g}; per view the outcome for a against b, the mean "
             "difference a - b (undecided: ± half the 95 % interval's width, and the seeds that would decide it) "
             "and the seeds in which a was ahead:"]
    for claim, a, b in DECISIVE_CLAIMS[:4] + DECISIVE_CLAIMS[9:]:
        p = _paired(rep, _label(rep, **a), _label(rep, **b), "success")
        if p is None:
            lines.append(f"- {claim}: not run.")
            continue
        lines.append(f"- {claim}: " + ", ".join(_outcome_text(v, p[v]) for v in VIEW_ORDER if v in p) + ".")
    sp = next((s for s in rep["speedup"] if s["setting"] == _label(rep, 0.5, "lowest_reward")), None)
    if sp and sp.get("speedup_end_to_end"):
        lines.append(f"- rho 0.5 ran {sp['speedup_end_to_end']:.2f}x faster than rho 1 end to end (iteration 0 "
                     f"included; per iteration {sp['speedup_per_seed']['mean']:.2f}x): on this CPU generation is a "
                     f"small share of an iteration ({sp['generation_share']:.2f}).")
    return "\n".join(lines)


def cpu_vs_trl() -> str:
    rows = _jsonl(DATA / "dev-cpu" / "vs_trl.jsonl")
    lines = [f"Machine: {machine(rows[0])}. `bench/vs_trl.py` (TRL {rows[0]['trl']}): one epoch of DPO over the "
             "non-tied pairs of the small-scale experiment's iteration-0 store (seed 1, kept as "
             "`docs/data/dev-cpu/vs_trl_rollouts.parquet`), batch "
             f"{rows[0]['batch']} in micro-batches of {rows[0]['micro_batch']}, reference log-probs included, "
             "fresh weights each repetition, medians.", "",
             "| precision | pairs | this project s | TRL DPOTrainer s | TRL / this project | tokens (ours / TRL's "
             "tokenisation) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['precision']} | {r['pairs']} | {r['ours_median_s']:.1f} {r['ours_s']} | "
                     f"{r['trl_median_s']:.1f} {r['trl_s']} | {r['ratio_trl_over_ours']:.2f} | "
                     f"{r['tokens_ours']} / {r['tokens_trl']} |")
    return "\n".join(lines)


def cpu_training_recheck() -> str:
    """This project's side of bench/vs_trl.py measured again (--skip-trl) against the recorded one, the same
    machine, store, batch and precision: the check that training did not get slower."""
    now = _jsonl(DATA / "dev-cpu" / "vs_trl_ours_recheck.jsonl")
    recorded = {r["precision"]: r for r in _jsonl(DATA / "dev-cpu" / "vs_trl.jsonl")}
    lines = [f"Machine: {machine(now[0])}. `bench/vs_trl.py --skip-trl`, the same store, batch, micro-batches "
             "and repetitions as the table above, measured again after the core-attention, data-path and layout "
             "changes, against the recorded medians:", "",
             "| precision | recorded s | now s | now / recorded |", "|---|---|---|---|"]
    for r in now:
        old = recorded[r["precision"]]
        lines.append(f"| {r['precision']} | {old['ours_median_s']:.1f} {old['ours_s']} | {r['ours_median_s']:.1f} "
                     f"{r['ours_s']} | {r['ours_median_s'] / old['ours_median_s']:.2f} |")
    return "\n".join(lines)


def precision_comparison() -> str:
    runs = {"bf16": DATA / "default_run", "fp32": DATA / "default_run_fp32"}
    lines = ["The default recipe (`make run`, seed 1234) in both precisions on this CPU, held-out evaluation "
             "after the last iteration (rendered from `docs/data/default_run*/`):", "",
             "| precision | held-out gold reward | exact accuracy | win score | iterations s | wall s |",
             "|---|---|---|---|---|---|"]
    for name, d in runs.items():
        ev = json.loads((d / "eval.json").read_text())
        last = ev["iterations"][max(ev["iterations"], key=int)]
        tot = sum(r["time_total_s"] for r in _jsonl(d / "metrics.jsonl"))
        meta = json.loads((d / "run.json").read_text())
        lines.append(f"| {name} | {last['reward_mean']:.3f} | {_f(last.get('accuracy'))} | "
                     f"{_f(last.get('win_score'), 1)} | {tot:.0f} | {meta['wall_s']:.0f} |")
    return "\n".join(lines)


def gold_proxy() -> str:
    r = json.loads((DATA / "gold_proxy" / "gold_proxy.json").read_text())
    a0, a1 = r["agreement_first_store"], r["agreement_last_store"]
    proxy = r["proxy_store_chosen_per_iteration"]
    gold = [g for g in r["gold_heldout_per_iteration"] if g is not None]
    return "\n".join([
        f"Recorded {r['date']} on {machine(r)}.", "",
        "| stage | measured |", "|---|---|",
        f"| (a) pairs from the starting policy, gold-labelled | {r['pairs']} pairs from {r['prompts_sampled']} "
        f"prompts ({r['ties_dropped']} ties dropped) |",
        f"| (b) reward model, held-out pairwise accuracy | {_f(r['rm_heldout_accuracy_first'])} before training -> "
        f"{_f(r['rm_heldout_accuracy_last'])} after {r['rm_epochs']} epochs ({r['rm_heldout_pairs']} held-out pairs) |",
        f"| (c) OPTune on the proxy: store chosen proxy reward per iteration | "
        f"{' -> '.join(f'{x:.3f}' for x in proxy)} |",
        f"| (d) held-out gold reward per iteration (start first) | {_f(r['gold_heldout_before'])} -> "
        f"{' -> '.join(f'{x:.3f}' for x in gold)} |",
        f"| (d) held-out exact accuracy before -> after | {_f(r['accuracy_heldout_before'])} -> "
        f"{_f(r['accuracy_heldout_after'])} |",
        f"| (d) win score after (gold judge, vs the start) | {_f(r['win_score_after'], 1)} |",
        f"| proxy-gold agreement on the policy's samples, iteration 0 -> last | {_f(a0['agreement'])} "
        f"({a0['pairs_ranked']} pairs) -> {_f(a1['agreement'])} ({a1['pairs_ranked']} pairs) |",
        f"| gold reward of the store's better response, iteration 0 -> last | {_f(a0['gold_best_mean'])} -> "
        f"{_f(a1['gold_best_mean'])} |"])


PILOT = RESULTS / "pilot"
SD_TARGETS = {"eval_accuracy": 0.03, "eval_reward_mean": 0.05}
"""The pilot's targets for the seed-to-seed SD at rho = 1 (the issue that asked for the decisive experiment)."""


def _yaml_value(path: Path, section: str, key: str) -> str:
    """`section.key` of a recorded config.yaml (two-level, as config_to_yaml writes it)."""
    inside = False
    for line in path.read_text().splitlines():
        if not line.startswith(" "):
            inside = line.rstrip() == f"{section}:"
        elif inside and line.strip().startswith(f"{key}:"):
            return line.split(":", 1)[1].strip()
    return "?"


def _pm(s: dict) -> str:
    return "–" if not s or s.get("mean") is None else f"{s['mean']:.3f} ± {_f(s.get('sd'))}"


def pilot_recipe_rows() -> list[dict]:
    """One row per recorded pilot recipe (docs/results/pilot/<recipe>/report.json and the config.yaml of one of
    its trained rho = 1 runs): the seed-to-seed spread at the last iteration against the targets, and the
    trained runs' mean gain over the no-training control."""
    rows = []
    for d in sorted(p for p in PILOT.iterdir() if (p / "report.json").is_file()):
        rep = json.loads((d / "report.json").read_text())
        trained, control = _label(rep, 1.0, "all"), _label(rep, 1.0, "all", trained=False)
        fin = rep.get("finals", {}).get(trained, {})
        ctl = rep.get("finals", {}).get(control, {}) if control else {}
        row = {"recipe": d.name, "config": d / "config.yaml", "finals": fin, "control": ctl,
               "seconds": (_final(rep["curves"], trained) or {}).get("cumulative_time_s", {}).get("mean")}
        row["meets"] = all((fin.get(k) or {}).get("sd") is not None and fin[k]["sd"] <= v
                           for k, v in SD_TARGETS.items())
        rows.append(row)
    return rows


def results_pilot() -> str:
    rows = pilot_recipe_rows()
    if not rows:
        raise FileNotFoundError(2, "no pilot recorded", str(PILOT / "r0" / "report.json"))
    lines = ["Held-out exact accuracy and gold reward of the trained rho = 1 runs at the last iteration, mean ± SD "
             "over seeds (the same 256 held-out prompts for every seed); the no-training control's value beside it. "
             f"Targets: SD <= {SD_TARGETS['eval_accuracy']} in accuracy and <= {SD_TARGETS['eval_reward_mean']} in "
             "gold reward (rendered by scripts/render_docs.py from docs/results/pilot/).", "",
             "| recipe | lr | epochs / iteration | prompts | batch | seeds | t | accuracy | gold reward | control "
             "accuracy | control gold reward | s per run | SD targets met | seeds per arm for a ±0.05 accuracy CI, "
             "unpaired |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc, rew = r["finals"].get("eval_accuracy", {}), r["finals"].get("eval_reward_mean", {})
        c = r["config"]
        cacc, crew = r["control"].get("eval_accuracy", {}), r["control"].get("eval_reward_mean", {})
        ctl = lambda s: "–" if not s else f"{s['mean']:.3f} (t={s['iteration']}, n={s['n']})"
        seconds = "–" if r["seconds"] is None else f"{r['seconds']:.0f}"
        lines.append(f"| {r['recipe']} | {_yaml_value(c, 'optim', 'lr')} | "
                     f"{_yaml_value(c, 'train', 'epochs_per_iteration')} | {_yaml_value(c, 'data', 'num_prompts')} | "
                     f"{_yaml_value(c, 'train', 'global_batch_size')} | {(acc or rew).get('n', 0)} | "
                     f"{(acc or rew).get('iteration', '–')} | {_pm(acc)} | {_pm(rew)} | {ctl(cacc)} | {ctl(crew)} | "
                     f"{seconds} | "
                     f"{'yes' if r['meets'] else 'no'} | {_unpaired_seeds(acc.get('sd'), 0.05)} |")
    lines += ["", "s per run: iterations 0-5 of one trained run, mean over seeds (some runs shared the machine with "
              "short test runs for minutes). Seeds per arm: 2 (1.96 SD / 0.05)^2, rounded up, what two unpaired "
              "settings would need for a 95 % interval of +-0.05 on their difference in accuracy; the decisive "
              "experiment pairs its settings by seed (forks of one iteration 0), which needs fewer when paired "
              "settings move together."]
    return "\n".join(lines)


def _unpaired_seeds(sd: float | None, half_width: float) -> str:
    return "–" if sd is None else str(math.ceil(2 * (1.96 * sd / half_width) ** 2))


BLOCKS = {"default-run": default_run, "results-pilot": results_pilot, "gpu-h100": gpu_h100,
          "cpu-generation": cpu_generation,
          "results-claims": results_claims, "results-report": results_report, "readme-headline": readme_headline,
          "results-decisive": results_decisive,
          "gold-proxy": gold_proxy, "cpu-vs-trl": cpu_vs_trl, "cpu-iteration": cpu_iteration,
          "cpu-generation-compile": cpu_generation_compile,
          "precision-comparison": precision_comparison, "cpu-training-recheck": cpu_training_recheck}


def render_block(name: str) -> str:
    """The block's text, or a line saying which recorded file it waits for."""
    try:
        return BLOCKS[name]()
    except FileNotFoundError as e:
        return f"*Not measured yet: `{Path(e.filename).relative_to(REPO)}` is not recorded.*"


def render_text(text: str) -> str:
    def sub(m: re.Match) -> str:
        return m.group(1) + render_block(m.group("name")).rstrip("\n") + "\n" + m.group(4)

    return BLOCK.sub(sub, text)


def documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when a generated block is stale")
    ap.add_argument("--root", type=Path, default=None,
                    help="render README.md, docs/*.md and docs/data, docs/results under this directory instead")
    args = ap.parse_args(argv)
    if args.root is not None:
        global REPO, DATA, RESULTS
        REPO = args.root.resolve()
        DATA, RESULTS = REPO / "docs" / "data", REPO / "docs" / "results"
    stale = []
    for path in documents():
        text = path.read_text()
        new = render_text(text)
        if new != text:
            stale.append(path.relative_to(REPO))
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print("render_docs: stale generated blocks in " + ", ".join(map(str, stale)) +
              " (run python scripts/render_docs.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
