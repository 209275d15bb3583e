"""The experiment report (optune_nemo/analysis/report.py) on tiny hand-made run directories laid out like a sweep
(two bases per seed, forks that inherit iteration 0): settings and seeds, per-iteration curves, the
cumulative cost axes, the speed-up next to Amdahl's bound, and the Fig. 2 split of the ranking-score gain,
every number checked against values computed by hand in the comments; report.md, report.json and the
figures written by the command line."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from optune_nemo.analysis.report import (
    Report,
    amdahl_bound,
    analyse,
    comparison_figure,
    comparisons,
    fig2_contrast,
    find_runs,
    gain_split,
    main,
    ranking_scores,
    render_markdown,
    store_path,
)
from optune_nemo.config import OptuneNemoConfig, config_to_yaml

# --------------------------------------------------------------------------- fixture run directories


def _config(*, rho, selection, loss, seed, epochs, iterations) -> OptuneNemoConfig:
    cfg = OptuneNemoConfig()
    return replace(cfg, seed=seed, optune=replace(cfg.optune, rho=rho, selection=selection, iterations=iterations),
                   loss=replace(cfg.loss, name=loss), train=replace(cfg.train, epochs_per_iteration=epochs))


def _record(t, *, total, gen, reward, tokens, eval_reward=None, win=None):
    rec = {"iteration": t, "regenerated": 4, "generated_tokens": tokens, "time_generation_s": gen,
           "time_reward_s": reward, "time_reference_s": 0.5, "time_train_s": total - gen - reward - 0.5,
           "time_total_s": total, "reward_chosen_mean": 0.5, "reward_rejected_mean": 0.2, "loss": 0.6}
    if eval_reward is not None:
        rec.update(eval_reward_mean=eval_reward, eval_win_score=win, eval_wins=1, eval_losses=0, eval_ties=1,
                   eval_invalid=0, eval_response_tokens_mean=7.0)
    return rec


def _store(path, scores: dict[int, tuple[float, float]], t: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = sorted(scores)
    pq.write_table(pa.table({"prompt_id": pa.array(ids, pa.int64()),
                             "reward_a": pa.array([scores[i][0] for i in ids], pa.float64()),
                             "reward_b": pa.array([scores[i][1] for i in ids], pa.float64()),
                             "generated_at_iteration": pa.array([t] * len(ids), pa.int64())}), path)


def _run(root, name, cfg, records, *, baseline_reward, fork_from=None, stores=None):
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(config_to_yaml(cfg))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (d / "eval.json").write_text(json.dumps({"baseline": {"reward_mean": baseline_reward, "num_prompts": 4},
                                             "iterations": {}}))
    if fork_from is not None:
        (d / "fork.json").write_text(json.dumps({"init_from": str(fork_from / "checkpoints" / "iter_000000"),
                                                 "iteration": 0}))
    for t, scores in (stores or {}).items():
        _store(d / "checkpoints" / f"iter_{t:06d}" / "rollouts.parquet", scores, t)
    (d / "COMPLETED").write_text("ok\n")
    return d


STORE_0 = {0: (0.1, 0.0), 1: (0.2, 0.9), 2: (0.5, 0.5), 3: (0.3, -1.0)}        # ranking scores .1 .9 .5 .3
STORE_1_TRAINED = {0: (0.6, 0.1), 1: (0.8, 0.8), 2: (0.0, 0.7), 3: (0.5, 0.5)}  # .6 .8 .7 .5
STORE_1_CONTROL = {0: (0.4, 0.4), 1: (0.7, 0.1), 2: (0.5, 0.2), 3: (0.0, 0.4)}  # .4 .7 .5 .4


@pytest.fixture
def sweep(tmp_path):
    """Seeds 1 and 2: a trained base (wdpo) forked into rho=1 (all) and rho=0.5 (lowest_reward), and a
    no-training base forked into a rho=1 control. Iteration 0 takes 10 s (6 s generation, 1 s reward) and
    1000 tokens; rho=1 iterations the same; rho=0.5 iterations 7 s (seed 1) / 8 s (seed 2), 500 tokens."""
    root = tmp_path / "sweep"
    for seed, base_reward, rho_half_time in ((1, 0.2, 7.0), (2, 0.3, 8.0)):
        it0 = _record(0, total=10.0, gen=6.0, reward=1.0, tokens=1000, eval_reward=base_reward, win=50.0)
        kw = dict(seed=seed, loss="wdpo", iterations=1)
        base = _run(root, f"base-wdpo-seed{seed}", _config(rho=1.0, selection="all", epochs=1, **kw), [it0],
                    baseline_reward=0.1, stores={0: STORE_0} if seed == 1 else None)
        base_nt = _run(root, f"base-wdpo-notrain-seed{seed}", _config(rho=1.0, selection="all", epochs=0, **kw),
                       [it0], baseline_reward=0.1, stores={0: STORE_0} if seed == 1 else None)
        kw["iterations"] = 3
        full = [it0] + [_record(t, total=10.0, gen=6.0, reward=1.0, tokens=1000,
                                eval_reward=base_reward + 0.1 * t * seed, win=50.0 + 10 * t) for t in (1, 2)]
        _run(root, f"rho1.0-all-wdpo-seed{seed}", _config(rho=1.0, selection="all", epochs=1, **kw), full,
             baseline_reward=0.1, fork_from=base, stores={1: STORE_1_TRAINED} if seed == 1 else None)
        half = [it0] + [_record(t, total=rho_half_time, gen=3.0, reward=0.5, tokens=500,
                                eval_reward=base_reward + 0.05 * t, win=50.0 + 5 * t * seed) for t in (1, 2)]
        _run(root, f"rho0.5-lowest_reward-wdpo-seed{seed}",
             _config(rho=0.5, selection="lowest_reward", epochs=1, **kw), half, baseline_reward=0.1, fork_from=base)
        control = [it0] + [_record(t, total=4.0, gen=3.5, reward=0.5, tokens=1000) for t in (1, 2)]
        _run(root, f"rho1.0-all-wdpo-notrain-seed{seed}", _config(rho=1.0, selection="all", epochs=0, **kw), control,
             baseline_reward=0.1, fork_from=base_nt, stores={1: STORE_1_CONTROL} if seed == 1 else None)
    return root


# --------------------------------------------------------------------------- pure pieces


def test_gain_split_by_hand():
    prev = {0: 0.1, 1: 0.9, 2: 0.5, 3: 0.3}
    cur = {0: 0.6, 1: 0.8, 2: 0.7, 3: 0.5}
    # bottom half at t-1: prompts 0 (0.1) and 3 (0.3): gains 0.5 + 0.2 = 0.7; top: 1 (-0.1) and 2 (+0.2) = 0.1
    got = gain_split(prev, cur)
    assert got["n"] == 4 and got["n_bottom"] == 2
    assert got["bottom"] == pytest.approx(0.7 / 4) and got["top"] == pytest.approx(0.1 / 4)
    assert got["total"] == pytest.approx(0.2)                  # mean(cur) - mean(prev) = 2.6/4 - 1.8/4
    assert got["share_bottom"] == pytest.approx(0.875)


def test_gain_split_odd_count_and_ties():
    # 5 prompts: the bottom is the ceil(5/2) = 3 lowest; equal scores go to the smaller id first
    prev = {10: 0.5, 11: 0.5, 12: 0.5, 13: 0.5, 14: 0.0}
    cur = {10: 1.5, 11: 0.5, 12: 0.5, 13: 0.0, 14: 0.0}
    got = gain_split(prev, cur)
    # bottom: 14, 10, 11 -> gains 0 + 1.0 + 0 = 1.0; top: 12, 13 -> 0 - 0.5 = -0.5
    assert got["n_bottom"] == 3
    assert got["bottom"] == pytest.approx(1.0 / 5) and got["top"] == pytest.approx(-0.5 / 5)
    assert got["share_bottom"] == pytest.approx(2.0)


def test_gain_split_with_no_change_has_no_share():
    assert gain_split({1: 0.5, 2: 0.5}, {1: 0.5, 2: 0.5})["share_bottom"] is None


def _split_row(group, seed, t, *, bottom_mean, top_mean, n=4, n_bottom=2):
    # a gain_split row whose bottom-half prompts gained `bottom_mean` each and top-half prompts `top_mean` each
    return {"group": group, "seed": seed, "iteration": t, "n": n, "n_bottom": n_bottom,
            "bottom": bottom_mean * n_bottom / n, "top": top_mean * (n - n_bottom) / n}


def test_fig2_contrast_by_hand():
    # d = bottom mean gain - top mean gain; trained minus control, paired by seed
    rows = [_split_row("control", 1, 1, bottom_mean=0.2, top_mean=-0.1),       # d = 0.3
            _split_row("control", 2, 1, bottom_mean=0.1, top_mean=0.0),        # d = 0.1
            _split_row("trained wdpo", 1, 1, bottom_mean=0.6, top_mean=0.1),   # d = 0.5 -> 0.5 - 0.3 = 0.2
            _split_row("trained wdpo", 2, 1, bottom_mean=0.3, top_mean=0.2),   # d = 0.1 -> 0.1 - 0.1 = 0.0
            _split_row("control", 1, 2, bottom_mean=0.0, top_mean=0.0),        # d = 0
            _split_row("trained wdpo", 1, 2, bottom_mean=0.4, top_mean=0.0),   # d = 0.4, one seed only
            _split_row("trained wdpo", 2, 2, bottom_mean=0.4, top_mean=0.0)]   # no control at seed 2, t 2
    got = {(c["group"], c["iteration"]): c for c in fig2_contrast(rows)}
    assert set(got) == {("trained wdpo", 1), ("trained wdpo", 2)}
    two = got[("trained wdpo", 1)]
    assert two["seeds"] == 2 and two["mean"] == pytest.approx(0.1)
    # the percentile bootstrap over two seeds can only draw means 0.0, 0.1 and 0.2
    assert 0.0 - 1e-12 <= two["ci95"][0] <= 0.1 <= two["ci95"][1] <= 0.2 + 1e-12
    one = got[("trained wdpo", 2)]
    assert one["seeds"] == 1 and one["mean"] == pytest.approx(0.4) and one["ci95"] is None


def test_fig2_contrast_in_report_md():
    rep = Report()
    rep.fig2 = {"summary": [], "attribution": [], "contrast": [
        {"group": "trained wdpo", "iteration": 1, "seeds": 3, "mean": 0.12, "ci95": [0.05, 0.2]},
        {"group": "trained wdpo", "iteration": 2, "seeds": 1, "mean": -0.04, "ci95": None}]}
    lines = render_markdown(rep).splitlines()
    assert "| trained wdpo | 1 | 3 | 0.12 | [0.05, 0.2] |" in lines
    assert "| trained wdpo | 2 | 1 | -0.04 | (one seed) |" in lines


def test_fig2_contrast_skips_a_degenerate_split():
    # a split with every prompt in one half has no contrast
    rows = [_split_row("control", 1, 1, bottom_mean=0.1, top_mean=0.0, n_bottom=4),
            _split_row("trained wdpo", 1, 1, bottom_mean=0.3, top_mean=0.0)]
    assert fig2_contrast(rows) == []


def test_amdahl_bound():
    assert amdahl_bound(0.6, 0.5) == pytest.approx(1 / 0.7)
    assert amdahl_bound(0.0, 0.3) == pytest.approx(1.0)
    assert amdahl_bound(1.0, 0.25) == pytest.approx(4.0)
    assert amdahl_bound(0.8, 1.0) == pytest.approx(1.0)


# --------------------------------------------------------------------------- on the fixture sweep


def test_forks_read_their_source_store(sweep):
    fork = sweep / "rho1.0-all-wdpo-seed1"
    assert store_path(fork, 0) == sweep / "base-wdpo-seed1" / "checkpoints" / "iter_000000" / "rollouts.parquet"
    assert store_path(fork, 1) == fork / "checkpoints" / "iter_000001" / "rollouts.parquet"
    assert store_path(fork, 2) is None
    assert ranking_scores(store_path(fork, 0)) == {0: 0.1, 1: 0.9, 2: 0.5, 3: 0.3}


def test_settings_seeds_and_fork_sources(sweep):
    rep = analyse(find_runs([sweep]))
    assert len(rep.runs) == 10
    assert [(s["label"], s["seeds"]) for s in rep.settings] == [
        ("rho=0.5 lowest_reward wdpo", [1, 2]),
        ("rho=1 all wdpo no-training", [1, 2]),
        ("rho=1 all wdpo", [1, 2]),
    ]
    assert sum(r["fork_source"] for r in rep.runs) == 4     # the bases are no settings of their own


def test_curves(sweep):
    rep = analyse(find_runs([sweep]))
    full = {p["iteration"]: p for p in rep.curves["rho=1 all wdpo"]["eval_reward_mean"]}
    # t=2: seed 1 0.2 + 0.2 = 0.4, seed 2 0.3 + 0.4 = 0.7
    assert full[2]["mean"] == pytest.approx(0.55) and full[2]["min"] == pytest.approx(0.4)
    assert full[2]["max"] == pytest.approx(0.7) and full[2]["n"] == 2
    assert full[0]["mean"] == pytest.approx(0.25)                      # the inherited iteration 0
    half = {p["iteration"]: p for p in rep.curves["rho=0.5 lowest_reward wdpo"]["eval_win_score"]}
    assert half[2]["mean"] == pytest.approx((60 + 70) / 2) and half[2]["min"] == 60 and half[2]["max"] == 70
    # cumulative cost at t=2: tokens 1000 + 500 + 500; seconds 10 + 7 + 7 (seed 1) and 10 + 8 + 8 (seed 2)
    assert half[2]["cumulative_tokens"]["mean"] == pytest.approx(2000)
    assert half[2]["cumulative_time_s"]["min"] == pytest.approx(24) and half[2]["cumulative_time_s"]["max"] == 26
    assert rep.curves["rho=1 all wdpo no-training"]["eval_reward_mean"][-1]["iteration"] == 0   # never evaluated after
    assert rep.baseline["mean"] == pytest.approx(0.1)


def test_seed_spread_at_the_last_common_iteration(sweep):
    """The pilot's measure: per setting, the sample SD over seeds at the last iteration every run evaluated."""
    rep = analyse(find_runs([sweep]))
    full = rep.finals["rho=1 all wdpo"]["eval_reward_mean"]
    # t=2: seed 1 0.2 + 0.1 * 2 * 1 = 0.4, seed 2 0.3 + 0.1 * 2 * 2 = 0.7; SD = |0.7 - 0.4| / sqrt(2)
    assert full["iteration"] == 2 and full["n"] == 2 and full["values"] == pytest.approx([0.4, 0.7])
    assert full["mean"] == pytest.approx(0.55) and full["sd"] == pytest.approx(0.3 / 2 ** 0.5)
    assert "eval_accuracy" not in rep.finals["rho=1 all wdpo"]             # these runs have no accuracy
    control = rep.finals["rho=1 all wdpo no-training"]["eval_reward_mean"]
    assert control["iteration"] == 0 and control["values"] == pytest.approx([0.2, 0.3])   # evaluated at t=0 only
    assert "Seed-to-seed spread" in render_markdown(rep)


def test_speedup_and_amdahl(sweep):
    rep = analyse(find_runs([sweep]))
    row = next(r for r in rep.speedup if r["setting"] == "rho=0.5 lowest_reward wdpo")
    # rho=1 iterations t>=1 take 10 s; rho=0.5: 7 s (seed 1), 8 s (seed 2) -> 10 / 7.5; per seed 10/7 and 10/8
    assert row["seeds"] == [1, 2]
    assert row["speedup"] == pytest.approx(10 / 7.5)
    assert row["speedup_per_seed"]["min"] == pytest.approx(1.25)
    assert row["speedup_per_seed"]["max"] == pytest.approx(10 / 7)
    # two seeds: a bootstrap over seeds draws (1.25, 1.25), a mixed pair or (10/7, 10/7): the interval spans them
    assert row["speedup_per_seed_ci95"] == pytest.approx([1.25, 10 / 7])
    # g over the rho=1 runs' t>=1: 6 s of 10 s; with reward 7 of 10
    assert row["generation_share"] == pytest.approx(0.6)
    assert row["amdahl_bound"] == pytest.approx(1 / (1 - 0.6 + 0.6 * 0.5))
    assert row["amdahl_bound_generation_reward"] == pytest.approx(1 / (1 - 0.7 + 0.7 * 0.5))
    control = next(r for r in rep.speedup if r["setting"] == "rho=1 all wdpo no-training")
    assert control["speedup"] == pytest.approx(1.0) and control["generation_share"] == pytest.approx(3.5 / 4)


def test_fig2_attribution(sweep):
    fig2 = analyse(find_runs([sweep])).fig2
    by = {(r["group"], r["iteration"]): r for r in fig2["summary"]}
    trained, control = by[("trained wdpo", 1)], by[("control", 1)]
    # trained: store 0 -> STORE_1_TRAINED (see test_gain_split_by_hand): bottom 0.175, top 0.025
    assert trained["n"] == 1 and trained["bottom"] == pytest.approx(0.175) and trained["top"] == pytest.approx(0.025)
    assert trained["share_bottom"] == pytest.approx(0.875)
    # control: .1->.4 (+.3), .3->.4 (+.1) in the bottom = 0.4 / 4; .9->.7 (-.2), .5->.5 (0) on top = -0.2 / 4
    assert control["bottom"] == pytest.approx(0.1) and control["top"] == pytest.approx(-0.05)
    assert control["total"] == pytest.approx(0.05)
    a = fig2["attribution"][0]
    assert a["group"] == "trained wdpo" and a["iteration"] == 1
    assert a["bottom_from_training"] == pytest.approx(0.075) and a["total_from_training"] == pytest.approx(0.15)
    assert a["share_bottom_of_training_gain"] == pytest.approx(0.5)
    assert a["bottom_regression_fraction"] == pytest.approx(0.1 / 0.175)
    # seed 2 keeps no stores, and no run has a store after iteration 2: those are listed, not guessed
    assert len(fig2["missing_stores"]) == 2 + 2 + 2


# --------------------------------------------------------------------------- figures


def _setting(rho, selection, loss="wdpo", trained=True):
    label = f"rho={rho:g} {selection} {loss}" + ("" if trained else " no-training")
    return {"label": label, "rho": rho, "selection": selection, "loss": loss, "trained": trained}


def test_comparisons_pair_each_setting_with_its_baseline():
    """The eight settings of docs/results: each against the setting that differs in one factor."""
    settings = [_setting(0.3, "lowest_reward"), _setting(0.5, "lowest_reward", "dpo"), _setting(0.5, "lowest_reward"),
                _setting(0.5, "random"), _setting(0.7, "lowest_reward"), _setting(0.7, "random"),
                _setting(1.0, "all", trained=False), _setting(1.0, "all")]
    assert comparisons(settings) == [
        ("rho=0.3 lowest_reward wdpo", "rho=1 all wdpo"),
        ("rho=0.5 lowest_reward dpo", "rho=0.5 lowest_reward wdpo"),
        ("rho=0.5 lowest_reward wdpo", "rho=1 all wdpo"),
        ("rho=0.5 random wdpo", "rho=0.5 lowest_reward wdpo"),
        ("rho=0.7 lowest_reward wdpo", "rho=1 all wdpo"),
        ("rho=0.7 random wdpo", "rho=0.7 lowest_reward wdpo"),
        ("rho=1 all wdpo no-training", "rho=1 all wdpo"),
    ]
    # a baseline not run: the next factor's (DPO at rho 0.5 against DPO at rho 1), or no panel
    assert comparisons([_setting(0.5, "lowest_reward", "dpo"), _setting(1.0, "all", "dpo")]) == [
        ("rho=0.5 lowest_reward dpo", "rho=1 all dpo")]
    assert comparisons([_setting(0.5, "random"), _setting(0.3, "lowest_reward")]) == []


def test_comparisons_of_num_samples():
    """n = 4 faces n = 2 at its own rho first; at rho < 1 also rho = 1 with n = 2 (as many samples per
    iteration: more samples per prompt against more prompts); the n = 2 settings keep their baselines."""
    n4 = [dict(_setting(0.5, "lowest_reward"), label="rho=0.5 lowest_reward wdpo n=4", num_samples=4),
          dict(_setting(1.0, "all"), label="rho=1 all wdpo n=4", num_samples=4)]
    settings = [_setting(0.5, "lowest_reward"), _setting(1.0, "all"), *n4]
    assert comparisons(settings) == [
        ("rho=0.5 lowest_reward wdpo", "rho=1 all wdpo"),
        ("rho=0.5 lowest_reward wdpo n=4", "rho=0.5 lowest_reward wdpo"),
        ("rho=0.5 lowest_reward wdpo n=4", "rho=1 all wdpo"),
        ("rho=1 all wdpo n=4", "rho=1 all wdpo"),
    ]
    # without the n = 2 runs, n = 4 at rho 0.5 faces n = 4 at rho 1 (the rho factor), and nothing else
    assert comparisons(n4) == [("rho=0.5 lowest_reward wdpo n=4", "rho=1 all wdpo n=4")]


def _visible(fig):
    return [ax for ax in fig.axes if ax.get_visible()]


def test_comparison_figure_one_panel_per_comparison(sweep):
    rep = analyse(find_runs([sweep]))
    fig = comparison_figure(rep, "eval_reward_mean", "iteration")
    axes = _visible(fig)
    assert [ax.get_title() for ax in axes] == ["rho=0.5 lowest_reward wdpo\nvs rho=1 all wdpo",
                                               "rho=1 all wdpo no-training\nvs rho=1 all wdpo"]
    # the rho=0.5 panel: its mean 0.25 + 0.05 t (seeds 0.2 / 0.3 + 0.05 t), the baseline's 0.25, 0.4, 0.55
    # (seeds 0.2 + 0.1 t and 0.3 + 0.2 t); the starting policy at 0.1
    means = [list(line.get_ydata()) for line in axes[0].get_lines() if len(line.get_xdata()) == 3]
    assert means[0] == pytest.approx([0.25, 0.4, 0.55])      # the baseline is drawn first
    assert means[1] == pytest.approx([0.25, 0.30, 0.35])
    ticks = [(t, lab.get_text()) for t, lab in zip(axes[0].get_xticks(), axes[0].get_xticklabels())]
    assert ticks == [(-1, "start"), (0, "0"), (1, "1"), (2, "2")]
    start = [line for line in axes[0].get_lines() if list(line.get_xdata()) == [-1]]
    assert len(start) == 1 and list(start[0].get_ydata()) == pytest.approx([0.1])
    # the legend lies outside every panel
    fig.canvas.draw()
    legend, = fig.legends
    box = legend.get_window_extent()
    for ax in axes:
        assert not box.overlaps(ax.get_window_extent())


def test_comparison_figure_takes_a_ci_band(sweep):
    rep = analyse(find_runs([sweep]))
    ci = {"x": [1, 2], "lo": [0.2, 0.25], "hi": [0.4, 0.45], "label": "95 % CI"}
    fig = comparison_figure(rep, "eval_win_score", "iteration",
                            cis={("rho=0.5 lowest_reward wdpo", "rho=1 all wdpo"): ci})
    hatched = [c for c in _visible(fig)[0].collections if c.get_hatch() == "///"]
    assert len(hatched) == 1
    assert "95 % CI" in [t.get_text() for t in fig.legends[0].get_texts()]
    assert not any(c.get_hatch() for c in _visible(fig)[1].collections)


def test_comparison_figure_grid_for_seven_panels():
    """Seven comparisons: a 2 x 4 grid with one empty slot hidden, every panel titled by its pair."""
    from optune_nemo.analysis.report import Report

    settings = [_setting(0.3, "lowest_reward"), _setting(0.5, "lowest_reward", "dpo"), _setting(0.5, "lowest_reward"),
                _setting(0.5, "random"), _setting(0.7, "lowest_reward"), _setting(0.7, "random"),
                _setting(1.0, "all", trained=False), _setting(1.0, "all")]
    point = {"iteration": 0, "mean": 0.0, "min": -0.1, "max": 0.1, "n": 2}
    curves = {s["label"]: {"eval_reward_mean": [point, {**point, "iteration": 1}], "eval_win_score": []}
              for s in settings}
    rep = Report(settings=settings, curves=curves, baseline={"mean": -0.2})
    fig = comparison_figure(rep, "eval_reward_mean", "iteration")
    assert len(fig.axes) == 8 and len(_visible(fig)) == 7
    assert [ax.get_title() for ax in _visible(fig)] == [f"{a}\nvs {b}" for a, b in comparisons(settings)]
    assert comparison_figure(rep, "eval_win_score", "iteration") is None


def test_command_line_writes_markdown_json_and_figures(sweep, tmp_path):
    out = tmp_path / "report"
    assert main([str(sweep), "--out", str(out)]) == 0
    md, data = (out / "report.md").read_text(), json.loads((out / "report.json").read_text())
    for label in ("rho=0.5 lowest_reward wdpo", "rho=1 all wdpo", "rho=1 all wdpo no-training"):
        assert f"| {label} |" in md
    assert "## Speed-up over rho = 1" in md and "## Fig. 2" in md
    for name in ("vs_iteration.png", "vs_tokens.png", "vs_time.png", "win_vs_iteration.png", "speedup.png",
                 "gain_split.png"):
        assert name in data["figures"] and f"]({name})" in md
        blob = (out / name).read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 5000, name
    # every number in the tables is in report.json (which keeps them unrounded)
    numbers = []

    def walk(v):
        if isinstance(v, bool):
            return
        if isinstance(v, (int, float)):
            numbers.append(float(v))
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(data)
    lines = md.splitlines()
    cells = [c for i, line in enumerate(lines) if line.startswith("| ") and not lines[i + 1].startswith("|---")
             for c in line.strip("|").split("|")[1:]]
    found = [float(x) for c in cells for x in re.findall(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?", c.replace("n=", ""))]
    assert len(found) > 50
    for x in found:
        assert any(abs(v - x) <= 5e-4 * max(abs(v), 1e-9) + 1e-12 for v in numbers), x


def test_command_line_without_runs(tmp_path, capsys):
    assert main([str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "no run directory" in capsys.readouterr().err
