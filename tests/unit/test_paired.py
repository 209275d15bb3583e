"""Per-prompt paired comparisons (optune_nemo.analysis.paired) on synthetic run directories whose truth is
known: an equal pair is equivalent, a shifted one better / worse, a noisy one undecided; at equal tokens two
arms on one cost curve are identical while at equal iterations the cheaper one is behind; the modelled time
ignores a run that shared the machine; a fork's iteration 0 comes from its base run."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from optune_nemo.analysis import paired
from optune_nemo.analysis.report import load_run
from optune_nemo.config import OptuneNemoConfig, config_to_yaml

ITERS = 4


def _write_run(d: Path, *, seed, rho, values, tokens, gen_seconds_per_token=0.01, fork_from=None,
               other_phases=(1.0, 0.8, 1.6)):
    """values: [iterations, prompts] per-prompt gold reward (success = reward > 0.5); tokens: per iteration.
    A fork (fork_from: the base run) keeps only iterations >= 1 of its own records and prompt files."""
    cfg = OptuneNemoConfig()
    cfg.seed, cfg.optune.rho = seed, rho
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(config_to_yaml(cfg))
    records = []
    for t in range(len(values)):
        records.append({"iteration": t, "generated_tokens": tokens[t], "regenerated": 10, "train_pairs": 8,
                        "time_generation_s": tokens[t] * gen_seconds_per_token, "time_reward_s": other_phases[0],
                        "time_reference_s": other_phases[1], "time_train_s": other_phases[2],
                        "time_total_s": tokens[t] * gen_seconds_per_token + sum(other_phases),
                        "eval_reward_mean": float(np.mean(values[t])),
                        "eval_accuracy": float(np.mean(np.asarray(values[t]) > 0.5))})
        if fork_from is not None and t == 0:
            continue
        (d / "eval").mkdir(exist_ok=True)
        n = len(values[t])
        ids = list(range(n))[::-1]                       # stored in another order: pairing is by prompt id
        v = [float(values[t][i]) for i in ids]
        pq.write_table(pa.table({"prompt_id": ids, "gold_reward": v, "success": [x > 0.5 for x in v]}),
                       d / "eval" / f"iter_{t:06d}.parquet")
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if fork_from is not None:
        (d / "fork.json").write_text(json.dumps({"init_from": str(fork_from / "checkpoints" / "iter_000000"),
                                                 "iteration": 0}))
    return load_run(d)


def _experiment(root, rng, *, shift, seeds, prompts, seed_sd, noise_sd, b_tokens=100, seed_effects=None):
    a_runs, b_runs = [], []
    for s in range(seeds):
        effect = seed_effects[s] if seed_effects is not None else rng.normal(0, seed_sd)
        start = rng.normal(0.3, 0.2, prompts)
        gains = np.cumsum(np.r_[0, np.full(ITERS - 1, 0.05)])[:, None]
        a = start + gains + rng.normal(0, noise_sd, (ITERS, prompts))
        b = a + np.r_[0, np.full(ITERS - 1, shift + effect)][:, None] \
            + np.r_[np.zeros((1, prompts)), rng.normal(0, noise_sd, (ITERS - 1, prompts))]
        base = root / f"base{s}"
        _write_run(base, seed=s, rho=1.0, values=a[:1], tokens=[100])
        a_runs.append(_write_run(root / f"a{s}", seed=s, rho=1.0, values=a, tokens=[100] * ITERS, fork_from=base))
        b_runs.append(_write_run(root / f"b{s}", seed=s, rho=0.5, values=b, tokens=[100] + [b_tokens] * (ITERS - 1),
                                 fork_from=base))
    return a_runs, b_runs


def _rates(runs):
    return paired.phase_rates(runs)


@pytest.mark.parametrize("shift,expected", [(0.0, "equivalent"), (0.25, "better"), (-0.25, "worse")])
def test_known_truths_at_equal_iterations(tmp_path, shift, expected):
    a, b = _experiment(tmp_path, np.random.default_rng(1), shift=shift, seeds=8, prompts=128, seed_sd=0.0,
                       noise_sd=0.02, b_tokens=100, seed_effects=[0.004, -0.004] * 4)   # they average to 0
    out = paired.compare_runs(a, b, key="gold_reward", margin=0.05, rates=_rates(a + b), reps=1000)
    assert out["iterations"].outcome == expected, out["iterations"]
    assert out["iterations"].seeds == 8 and out["iterations"].prompts == 128
    assert out["iterations"].ci95[0] < shift < out["iterations"].ci95[1]


def test_noisy_is_undecided(tmp_path):
    a, b = _experiment(tmp_path, np.random.default_rng(2), shift=0.0, seeds=3, prompts=32, seed_sd=0.3,
                       noise_sd=0.3, seed_effects=[0.3, -0.3, 0.1])      # the training trajectory dominates
    out = paired.compare_runs(a, b, key="gold_reward", margin=0.05, rates=_rates(a + b), reps=1000)
    assert out["iterations"].outcome == "undecided"


def test_equal_tokens_puts_two_arms_on_one_cost_curve(tmp_path):
    """Both arms gain 0.001 per generated token for every prompt: at equal tokens they are the same (the
    difference is exactly 0), at equal iterations the arm that generated half as much is behind by
    0.001 * 50 * 3 = 0.15."""
    offsets = np.linspace(0, 0.2, 16)
    a_runs, b_runs = [], []
    for s in range(5):
        base = tmp_path / f"base{s}"
        cum_a, cum_b = np.cumsum([100] * ITERS), np.cumsum([100] + [50] * (ITERS - 1))
        _write_run(base, seed=s, rho=1.0, values=(0.001 * cum_a[:1, None] + offsets), tokens=[100])
        a_runs.append(_write_run(tmp_path / f"a{s}", seed=s, rho=1.0, values=0.001 * cum_a[:, None] + offsets,
                                 tokens=[100] * ITERS, fork_from=base, other_phases=(0, 0, 0)))
        b_runs.append(_write_run(tmp_path / f"b{s}", seed=s, rho=0.5, values=0.001 * cum_b[:, None] + offsets,
                                 tokens=[100] + [50] * (ITERS - 1), fork_from=base, other_phases=(0, 0, 0)))
    out = paired.compare_runs(a_runs, b_runs, key="gold_reward", margin=0.05, rates=_rates(a_runs + b_runs),
                              reps=500)
    assert out["tokens"].mean == pytest.approx(0.0, abs=1e-12) and out["tokens"].outcome == "equivalent"
    assert out["time"].mean == pytest.approx(0.0, abs=1e-9)   # generation is the only phase: time ~ tokens
    assert out["iterations"].mean == pytest.approx(-0.15) and out["iterations"].outcome == "worse"
    # area under the curve over iterations 0..3 (trapezoids on a unit grid), offsets aside: A 0.1 0.2 0.3 0.4
    # -> 1.5 / 6 = 0.25; B 0.1 0.15 0.2 0.25 -> 1.05 / 6 = 0.175
    assert out["auc"].mean == pytest.approx(0.175 - 0.25)


def test_phase_rates_ignore_a_run_that_shared_the_machine(tmp_path):
    fast = [_write_run(tmp_path / f"r{i}", seed=i, rho=1.0, values=np.zeros((ITERS, 2)), tokens=[100] * ITERS)
            for i in range(3)]
    slow = _write_run(tmp_path / "slow", seed=9, rho=1.0, values=np.zeros((ITERS, 2)), tokens=[100] * ITERS,
                      gen_seconds_per_token=0.05)
    rates = paired.phase_rates([*fast, slow])
    assert rates["time_generation_s"] == pytest.approx(0.01)
    assert rates["time_reward_s"] == pytest.approx(0.1) and rates["time_train_s"] == pytest.approx(0.2)
    # the slow run is charged like the others: 100 tokens x 0.01 + 10 x 0.1 + 8 x (0.1 + 0.2) per iteration
    assert paired.cumulative(slow, "time", rates)[ITERS - 1] == pytest.approx(ITERS * (1.0 + 1.0 + 2.4))


def test_a_forks_iteration_0_is_read_from_its_base(tmp_path):
    base = _write_run(tmp_path / "base", seed=1, rho=1.0, values=np.full((1, 3), 0.7), tokens=[100])
    fork = _write_run(tmp_path / "fork", seed=1, rho=0.5, values=np.full((ITERS, 3), 0.2), tokens=[100] * ITERS,
                      fork_from=base.path)
    assert paired.records_path(fork.path, 0) == base.path / "eval" / "iter_000000.parquet"
    its, ys = paired.prompt_curve(fork, "gold_reward")
    assert its == list(range(ITERS)) and ys[0].tolist() == [0.7] * 3 and ys[1].tolist() == [0.2] * 3
    assert paired.prompt_curve(fork, "no_such_column") is None


def test_the_report_carries_the_outcomes_and_the_predicted_speedup(tmp_path):
    from optune_nemo.analysis.report import analyse, find_runs, render_markdown

    _experiment(tmp_path, np.random.default_rng(3), shift=0.25, seeds=6, prompts=64, seed_sd=0.0, noise_sd=0.02,
                b_tokens=50, seed_effects=[0.0] * 6)
    rep = analyse(find_runs([tmp_path]), margin=0.05, reps=500)
    (entry,) = [p for p in rep.paired if p["endpoint"] == "gold_reward"]
    assert entry["setting"].startswith("rho=0.5") and entry["baseline"].startswith("rho=1")
    assert entry["views"]["iterations"]["outcome"] == "better"
    assert set(entry["views"]) == {"iterations", "tokens", "time", "auc"}
    assert "| **better** |" in render_markdown(rep)
    (sp,) = rep.speedup if len(rep.speedup) == 1 else [r for r in rep.speedup if r["rho"] == 0.5]
    # per iteration t >= 1: rho = 1 takes 1.0 (100 tokens) + 3.4 s, rho = 0.5 0.5 (50 tokens) + 3.4 s; the
    # prediction swaps generation + reward (2.0 s) for the setting's (1.5 s); end to end adds iteration 0
    assert sp["predicted_speedup"] == pytest.approx(4.4 / 3.9)
    assert sp["speedup_end_to_end"] == pytest.approx((4 * 4.4) / (4.4 + 3 * 3.9))


def test_figures_mark_the_paired_interval_where_the_comparison_was_made(tmp_path):
    """B = A + 0.25 per prompt: the mark on B's panel is the paired 95 % interval added to A's mean at the
    last iteration (or at the tokens budget both arms reached), and it holds B's mean there; the time axis
    (measured seconds) has no mark; the accuracy figures are drawn."""
    from optune_nemo.analysis.report import analyse, find_runs, paired_marks, write_report

    _experiment(tmp_path, np.random.default_rng(7), shift=0.25, seeds=5, prompts=64, seed_sd=0.0, noise_sd=0.02,
                b_tokens=50, seed_effects=[0.0] * 5)
    rep = analyse(find_runs([tmp_path]), margin=0.05, reps=400)
    (entry,) = [p for p in rep.paired if p["endpoint"] == "gold_reward"]
    views = entry["views"]
    assert views["iterations"]["at"] == ITERS - 1 and views["auc"]["at"] is None
    assert views["tokens"]["at"] == pytest.approx(100 + 50 * (ITERS - 1))    # B's total: the smaller of the two
    a_curve, b_curve = (rep.curves[entry[k]]["eval_reward_mean"] for k in ("baseline", "setting"))
    (mark,) = paired_marks(rep, "eval_reward_mean", "iteration").values()
    a_last, b_last = a_curve[-1]["mean"], b_curve[-1]["mean"]
    assert mark["x"] == [ITERS - 1]
    assert mark["lo"][0] == pytest.approx(a_last + views["iterations"]["ci95"][0])
    assert mark["lo"][0] < b_last < mark["hi"][0]
    assert paired_marks(rep, "eval_reward_mean", "cumulative_time_s") == {}
    (tok,) = paired_marks(rep, "eval_reward_mean", "cumulative_tokens").values()
    a_x = [p["cumulative_tokens"]["mean"] for p in a_curve]
    assert tok["x"] == [100 + 50 * (ITERS - 1)] and a_x[1] < tok["x"][0] < a_x[2]   # between A's iterations 1, 2
    write_report(None, tmp_path / "out", recorded=rep)
    for name in ("accuracy_vs_iteration.png", "accuracy_vs_tokens.png", "vs_iteration.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0 and name in rep.figures
