"""train_rm's verdict on its own reward model (optune_nemo/rm/train.py): the one-sided exact binomial test
against chance, checked against sums written out by hand and an independent float64 computation through
log-gamma; the over-fitting rule, early stopping's count and the held-out size on hand-made records; the
keys that configure them."""

from __future__ import annotations

import math

import pytest

from optune_nemo.config import ConfigError
from optune_nemo.rm.config import load_config, validate
from optune_nemo.rm.train import (
    ALPHA,
    binomial_tail,
    evaluations_since_best,
    heldout_count,
    overfitting,
    verdict,
    verdict_summary,
)


def _tail_lgamma(k: int, n: int) -> float:
    """P(X >= k), X ~ Binomial(n, 1/2), in float64 from log-gamma (no integer binomials)."""
    return sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2))
               for i in range(k, n + 1))


@pytest.mark.parametrize("k, n, want", [
    (0, 5, 1.0),
    (1, 1, 1 / 2),
    (2, 3, (3 + 1) / 8),                          # C(3,2) + C(3,3)
    (8, 10, (45 + 10 + 1) / 1024),                # C(10,8) + C(10,9) + C(10,10)
    (14, 19, (11628 + 3876 + 969 + 171 + 19 + 1) / 2**19),   # C(19,14..19)
    (5, 5, 1 / 32),
])
def test_binomial_tail_by_hand(k, n, want):
    assert binomial_tail(k, n) == pytest.approx(want, rel=1e-15)


@pytest.mark.parametrize("n", [7, 19, 33, 64, 200, 1000])
def test_binomial_tail_against_log_gamma(n):
    for k in range(0, n + 1, max(1, n // 17)):
        assert binomial_tail(k, n) == pytest.approx(_tail_lgamma(k, n), rel=1e-9, abs=1e-300), (k, n)


def test_binomial_tail_refuses_impossible_counts():
    with pytest.raises(ValueError):
        binomial_tail(6, 5)
    with pytest.raises(ValueError):
        binomial_tail(-1, 5)


def _eval(step, correct, pairs, loss, train_loss):
    return {"iteration": step, "eval_correct": correct, "eval_pairs": pairs, "eval_accuracy": correct / pairs,
            "eval_loss": loss, "train_eval_loss": train_loss}


def test_the_reported_run_does_not_beat_chance():
    """The issue's run: 9 of 19 held-out pairs right before and after (0.474): p = P(X >= 9) = 0.676."""
    records = [_eval(0, 9, 19, 0.70, 0.70), {"iteration": 5, "train_loss": 0.69}, _eval(11, 9, 19, 0.69, 0.68)]
    v = verdict(records)
    assert v["heldout_p_value"] == pytest.approx(_tail_lgamma(9, 19)) and v["heldout_p_value"] > 0.6
    assert v["heldout_beats_chance"] is False and v["overfit"] is False


def test_threshold_at_64_pairs():
    """With 64 held-out pairs, 40 right beats chance at alpha 0.05 (p = 0.0300) and 39 does not (p = 0.0517)."""
    assert ALPHA == 0.05
    assert _tail_lgamma(40, 64) < 0.05 < _tail_lgamma(39, 64)
    assert verdict([_eval(0, 32, 64, 0.7, 0.7), _eval(8, 40, 64, 0.6, 0.6)])["heldout_beats_chance"] is True
    assert verdict([_eval(0, 32, 64, 0.7, 0.7), _eval(8, 39, 64, 0.6, 0.6)])["heldout_beats_chance"] is False


def test_judged_on_the_last_evaluation():
    # beat chance in the middle, not at the end: the exported (last) model is what counts
    records = [_eval(0, 30, 64, 0.7, 0.7), _eval(8, 50, 64, 0.5, 0.5), _eval(16, 33, 64, 0.69, 0.4)]
    assert verdict(records)["heldout_beats_chance"] is False


def test_overfitting_rule():
    first = {"eval_loss": 0.70, "train_eval_loss": 0.70}
    # the 4-epoch run: held-out loss 0.70 -> 1.17 while the training loss fell
    assert overfitting(first, {"eval_loss": 1.17, "train_eval_loss": 0.55}) is True
    assert overfitting(first, {"eval_loss": 0.60, "train_eval_loss": 0.55}) is False   # both fell: learning
    assert overfitting(first, {"eval_loss": 0.80, "train_eval_loss": 0.75}) is False   # both rose: diverging
    assert overfitting(first, {"eval_loss": 0.70, "train_eval_loss": 0.40}) is False   # held-out flat
    records = [_eval(0, 32, 64, 0.70, 0.70), _eval(8, 27, 64, 1.17, 0.55)]
    assert verdict(records)["overfit"] is True
    assert verdict(records[:1])["overfit"] is None      # one evaluation: nothing to compare
    assert verdict([{"iteration": 3, "train_loss": 0.5}]) == {}


def test_summary_holds_the_numbers_behind_the_verdict():
    records = [_eval(0, 32, 64, 0.70, 0.70), _eval(8, 27, 64, 1.17, 0.55)]
    records[-1]["early_stopped"] = False
    s = verdict_summary(records)
    assert (s["steps"], s["heldout_pairs"], s["heldout_correct"], s["alpha"]) == (8, 64, 27, 0.05)
    assert (s["heldout_beats_chance"], s["overfit"], s["early_stopped"]) == (False, True, False)
    assert s["eval_loss_first_last"] == [0.70, 1.17] and s["train_eval_loss_first_last"] == [0.70, 0.55]
    none = verdict_summary([{"iteration": 4, "train_loss": 0.3, "early_stopped": False}])
    assert (none["heldout_pairs"], none["heldout_beats_chance"], none["overfit"]) == (0, None, None)


@pytest.mark.parametrize("losses, want", [
    ([], 0), ([0.7], 0), ([0.7, 0.6, 0.5], 0), ([0.5, 0.6, 0.7], 2), ([0.7, 0.5, 0.6, 0.55], 2),
    ([0.7, 0.7], 1),            # equal to the best is no improvement
    ([0.7, 0.5, 0.5, 0.4], 0),
])
def test_evaluations_since_best(losses, want):
    assert evaluations_since_best(losses) == want


@pytest.mark.parametrize("n, fraction, floor, want", [
    (192, 0.1, 64, 48),     # round(19.2) = 19 raised to min(64, 192 // 4 = 48)
    (256, 0.1, 64, 64),
    (1000, 0.1, 64, 100),   # the fraction wins
    (40, 0.25, 64, 10),
    (30, 0.2, 64, 7),
    (192, 0.1, 0, 19),      # no floor
    (192, 0.0, 64, 0),      # no evaluation
])
def test_heldout_count(n, fraction, floor, want):
    assert heldout_count(n, fraction, floor) == want


def test_keys_are_validated(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    base = ["policy.hf_path=null", f"data.path={path}"]
    validate(load_config([*base, "rm.early_stopping_patience=2", "rm.eval_min_pairs=0"]))
    for key in ("rm.early_stopping_patience", "rm.eval_min_pairs"):
        with pytest.raises(ConfigError, match=f"^{key}: must be >= 0"):
            validate(load_config([*base, f"{key}=-1"]))


def test_early_stopping_needs_heldout_pairs(tmp_path):
    from optune_nemo.rm.train import check_inputs

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    cfg = load_config(["policy.hf_path=null", f"data.path={path}", "rm.early_stopping_patience=2",
                       "rm.eval_fraction=0"])
    with pytest.raises(ConfigError, match="^rm.early_stopping_patience: needs held-out pairs"):
        check_inputs(cfg, world_size=1)


def test_the_power_table_in_the_docs_is_what_the_test_computes():
    """docs/reward_models.md's table (held-out pairs, right pairs needed, passing probability at a true
    accuracy a) and its gold-proxy p-value, recomputed: the smallest k with binomial_tail(k, n) <= 0.05, and
    P(X >= k) under Binomial(n, a) summed with math.comb."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "reward_models.md").read_text()
    rows = re.findall(r"^\| (\d+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", text, re.M)
    assert len(rows) == 4, rows
    for n, k, acc, *powers in rows:
        n, k = int(n), int(k)
        need = next(j for j in range(n + 1) if binomial_tail(j, n) <= 0.05)
        assert need == k and float(acc) == pytest.approx(k / n, abs=0.005), (n, k)
        for a, shown in zip((0.6, 0.65, 0.7, 0.8), powers):
            p = sum(math.comb(n, j) * a ** j * (1 - a) ** (n - j) for j in range(k, n + 1))
            assert float(shown) == pytest.approx(p, abs=0.005), (n, a, shown, p)
    assert "20 of 33 held-out pairs right" in text and "p = 0.148" in text
    assert binomial_tail(20, 33) == pytest.approx(0.148, abs=0.0005)
    import json

    recorded = json.loads((Path(__file__).resolve().parents[2] / "docs" / "data" / "gold_proxy" /
                           "gold_proxy.json").read_text())["agreement_first_store"]
    assert f"was {recorded['agreement']:.3f} ({recorded['pairs_ranked']} pairs)" in " ".join(text.split())
