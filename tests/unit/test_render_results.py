"""scripts/render_docs.py's decisive-experiment block and README headline on a hand-written report.json: the
outcomes read from a's side (flipped where the report stored a as the baseline), the undecided cells' seed
counts, a comparison not run, and the speed-up row with its interval."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def render_docs(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import render_docs as mod
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(mod, "RESULTS", tmp_path)
    return mod


def _setting(label, rho, selection, loss="wdpo", trained=True, n=2):
    return {"label": label, "rho": rho, "selection": selection, "loss": loss, "trained": trained, "num_samples": n,
            "seeds": [1, 2, 3], "runs": []}


def _view(outcome, mean, lo, hi, more=None):
    return {"outcome": outcome, "mean": mean, "ci95": [lo, hi], "ci90": [lo, hi], "margin": 0.05, "seeds": 3,
            "prompts": 256, "positive_seeds": 2, "negative_seeds": 1, "sign_p": 1.0, "seeds_to_decide": more}


def _report():
    full, half, rnd = "rho=1 all wdpo", "rho=0.5 lowest_reward wdpo", "rho=0.5 random wdpo"
    views = lambda o, m, lo, hi, more=None: {v: _view(o, m, lo, hi, more)
                                             for v in ("iterations", "tokens", "time", "auc")}
    return {
        "settings": [_setting(half, 0.5, "lowest_reward"), _setting(rnd, 0.5, "random"),
                     _setting(full, 1.0, "all")],
        "runs": [{"setting": full, "seed": s, "completed": s != 3, "fork_source": False} for s in (1, 2, 3)],
        "paired": [
            {"setting": half, "baseline": full, "endpoint": "success", "endpoint_name": "exact accuracy",
             "views": views("equivalent", -0.01, -0.03, 0.02)},
            # the report stores random against lowest_reward: the claim reads lowest_reward against random
            {"setting": rnd, "baseline": half, "endpoint": "success", "endpoint_name": "exact accuracy",
             "views": views("worse", -0.08, -0.12, -0.04)},
            {"setting": half, "baseline": full, "endpoint": "gold_reward", "endpoint_name": "gold reward",
             "views": views("undecided", 0.03, -0.05, 0.11, more=17)}],
        "speedup": [{"setting": half, "rho": 0.5, "speedup_per_seed": {"mean": 1.08, "min": 1.0, "max": 1.2, "n": 3},
                     "speedup_per_seed_ci95": [1.01, 1.15], "speedup_end_to_end": 1.061, "predicted_speedup": 1.1,
                     "time_per_iteration_s": {"mean": 50.0}, "generation_share": 0.21}],
        "fig2": {"contrast": []}, "margin": 0.05, "curves": {}}


def test_decisive_block(render_docs, tmp_path):
    (tmp_path / "decisive" / "report").mkdir(parents=True)
    (tmp_path / "decisive" / "report" / "report.json").write_text(json.dumps(_report()))
    text = render_docs.results_decisive()
    assert text.startswith("2 seeds recorded (seeds 1, 2). With fewer than 5 paired seeds every "
                           "outcome is undecided by rule")
    # the summary sentence: decided views plainly, the one not run named in the precision list (the gold
    # reward's undecided cells are not the primary endpoint, so they are not listed)
    assert ("rho 0.5 keeps rho 1's quality (paper): equivalent (iterations: -0.010, 2 of 3 seeds), equivalent "
            "(tokens: -0.010, 2 of 3 seeds)") in text
    assert "wDPO learns faster than DPO, rho 0.5 (paper; AUC is its endpoint): not run" in text
    assert text.splitlines()[0].endswith(
        "Neither decided nor measured to ±0.1 (95 % half-width): rho 0.3 keeps rho 1's quality (paper): not run; "
        "wDPO learns faster than DPO, rho 0.5 (paper; AUC is its endpoint): not run; smallest_gap against "
        "lowest-reward, rho 0.5 (challenger): not run; oldest against lowest-reward, rho 0.5 (challenger): not run.")
    from optune_nemo.analysis.stats import MIN_SEEDS

    assert render_docs.MIN_SEEDS == MIN_SEEDS
    lines = text.splitlines()
    rho = next(x for x in lines if x.startswith("| rho 0.5 keeps rho 1's quality"))
    assert rho.count("equivalent (-0.010 [-0.030, +0.020]; a ahead in 2 of 3)") == 4
    sel = next(x for x in lines if x.startswith("| lowest-reward beats random"))
    assert sel.count("better (+0.080 [+0.040, +0.120]; a ahead in 1 of 3)") == 4 and "| 3 |" in sel   # flipped
    assert next(x for x in lines if x.startswith("| oldest against")).count("not run") == 4
    gold = [x for x in lines if x.startswith("| rho 0.5 keeps rho 1's quality")][1]
    assert gold.count("undecided (+0.030 [-0.050, +0.110]; a ahead in 2 of 3; ~17 seeds to decide)") == 4
    assert "| rho=0.5 lowest_reward wdpo | 1.080x [1.010, 1.150] | 1.061x | 1.100x | 50.0 |" in lines
    head = render_docs.readme_headline()
    assert head.startswith("The decisive experiment so far (") and "2 seeds" in head
    assert ("- lowest-reward beats random, rho 0.5 (paper): better (iterations: +0.080, 1 of 3 seeds), better "
            "(tokens: +0.080, 1 of 3 seeds), better (time: +0.080, 1 of 3 seeds), better (auc: +0.080, 1 of 3 "
            "seeds).") in head
    assert "rho 0.5 ran 1.06x faster than rho 1 end to end" in head


def test_decisive_block_fig2_contrast(render_docs, tmp_path):
    # the contrast row: mean and interval per iteration; an iteration with one seed has no interval
    rep = _report()
    rep["fig2"]["contrast"] = [
        {"group": "trained wdpo", "iteration": 1, "seeds": 3, "mean": 0.12, "ci95": [0.05, 0.2]},
        {"group": "trained wdpo", "iteration": 2, "seeds": 1, "mean": -0.04, "ci95": None},
        {"group": "trained dpo", "iteration": 1, "seeds": 3, "mean": 9.0, "ci95": [8.0, 10.0]}]
    (tmp_path / "decisive" / "report").mkdir(parents=True)
    (tmp_path / "decisive" / "report" / "report.json").write_text(json.dumps(rep))
    row = next(x for x in render_docs.results_decisive().splitlines() if x.startswith("| bottom minus top"))
    assert row == ("| bottom minus top, trained minus control | +0.120 [+0.050, +0.200] (n = 3) | "
                   "-0.040 (one seed) (n = 1) |")


def test_headline_falls_back_to_the_recording_without_the_decisive_report(render_docs, tmp_path, monkeypatch):
    monkeypatch.setattr(render_docs, "decisive_headline", lambda: pytest.fail("no decisive report"))
    (tmp_path / "report.json").write_text((REPO / "docs" / "results" / "report.json").read_text())
    assert "Small-scale reproduction" in render_docs.readme_headline()


def test_decisive_summary_undecided_views_and_precision(render_docs, tmp_path):
    # five seeds: an undecided view states its half-width and seeds to decide; a view wider than ±0.1 is listed,
    # one at ±0.1 or narrower is not; the headline drops "so far"
    rep = _report()
    rep["runs"] = [{"setting": "rho=1 all wdpo", "seed": s, "completed": True, "fork_source": False}
                   for s in range(1, 6)]
    views = rep["paired"][0]["views"]
    views["tokens"] = _view("undecided", 0.02, -0.07, 0.11, more=36)      # half-width 0.090: measured
    views["time"] = _view("undecided", -0.01, -0.13, 0.104, more=80)      # half-width 0.117: not measured
    (tmp_path / "decisive" / "report").mkdir(parents=True)
    (tmp_path / "decisive" / "report" / "report.json").write_text(json.dumps(rep))
    first = render_docs.results_decisive().splitlines()[0]
    assert first.startswith("5 seeds recorded (seeds 1, 2, 3, 4, 5). Held-out exact accuracy")
    assert ("rho 0.5 keeps rho 1's quality (paper): equivalent (iterations: -0.010, 2 of 3 seeds), undecided "
            "(tokens: +0.020 ± 0.090, 2 of 3 seeds, ~36 seeds to decide), undecided (time: -0.010 ± 0.117, 2 of 3 "
            "seeds, ~80 seeds to decide), equivalent (auc: -0.010, 2 of 3 seeds);") in first
    assert "rho 0.5 keeps rho 1's quality (paper) (time, ±0.117)" in first
    assert "(tokens, ±" not in first
    assert render_docs.readme_headline().startswith("The decisive experiment ([docs/results.md]")
