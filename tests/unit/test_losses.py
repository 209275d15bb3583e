"""Preference losses against independent float64 formulas from SPEC.md (paper eqs. 1, 5, 6)."""

import math
import random

import pytest
import torch

from optune_nemo.losses import bradley_terry_loss, dpo_loss, dpo_per_pair, wdpo_loss, wdpo_per_pair


def _log_sigmoid(z: float) -> float:
    # numerically stable log(1 / (1 + exp(-z))), pure python
    if z >= 0:
        return -math.log1p(math.exp(-z))
    return z - math.log1p(math.exp(z))


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def _random_case(seed: int, n: int = 7):
    rng = random.Random(seed)
    pc = [rng.uniform(-60.0, -5.0) for _ in range(n)]
    pr = [rng.uniform(-60.0, -5.0) for _ in range(n)]
    rc = [rng.uniform(-60.0, -5.0) for _ in range(n)]
    rr = [rng.uniform(-60.0, -5.0) for _ in range(n)]
    cw = [rng.uniform(-2.0, 3.0) for _ in range(n)]
    cl = [w - rng.uniform(0.0, 4.0) for w in cw]
    beta1 = rng.choice([0.05, 0.1, 0.5, 1.0])
    beta2 = rng.choice([0.5, 1.0, 2.0, 5.0])
    return pc, pr, rc, rr, cw, cl, beta1, beta2


def _expected(pc, pr, rc, rr, cw, cl, beta1, beta2):
    margins, weights, per = [], [], []
    for i in range(len(pc)):
        m = beta1 * ((pc[i] - rc[i]) - (pr[i] - rr[i]))
        w = _sigmoid(beta2 * (cw[i] - cl[i]))
        margins.append(m)
        weights.append(w)
        per.append(-w * _log_sigmoid(m))
    return margins, weights, per


def _t(xs, dtype=torch.float64, grad=False):
    return torch.tensor(xs, dtype=dtype, requires_grad=grad)


@pytest.mark.parametrize("seed", range(5))
def test_wdpo_loss_matches_hand_formula(seed):
    pc, pr, rc, rr, cw, cl, b1, b2 = _random_case(seed)
    margins, weights, per = _expected(pc, pr, rc, rr, cw, cl, b1, b2)
    loss, metrics = wdpo_loss(_t(pc), _t(pr), _t(rc), _t(rr), _t(cw), _t(cl), beta1=b1, beta2=b2)
    assert loss.dtype == torch.float64
    want = sum(per) / len(per)
    assert float(loss) == pytest.approx(want, rel=1e-12, abs=1e-14)
    assert metrics["loss"] == pytest.approx(want, rel=1e-12, abs=1e-14)
    assert metrics["margin_mean"] == pytest.approx(sum(margins) / len(margins), rel=1e-12, abs=1e-14)
    assert metrics["wdpo_weight_mean"] == pytest.approx(sum(weights) / len(weights), rel=1e-12)
    acc = sum(1 for i in range(len(pc)) if (pc[i] - rc[i]) > (pr[i] - rr[i])) / len(pc)
    assert metrics["implicit_reward_accuracy"] == pytest.approx(acc, abs=1e-15)


@pytest.mark.parametrize("seed", range(5))
def test_wdpo_per_pair_matches_hand_formula(seed):
    pc, pr, rc, rr, cw, cl, b1, b2 = _random_case(seed + 100)
    margins, weights, per = _expected(pc, pr, rc, rr, cw, cl, b1, b2)
    got, margin, weight = wdpo_per_pair(_t(pc), _t(pr), _t(rc), _t(rr), _t(cw), _t(cl), beta1=b1, beta2=b2)
    assert got.shape == margin.shape == weight.shape == (len(pc),)
    for i in range(len(pc)):
        assert float(got[i]) == pytest.approx(per[i], rel=1e-12, abs=1e-14)
        assert float(margin[i]) == pytest.approx(margins[i], rel=1e-12, abs=1e-14)
        assert float(weight[i]) == pytest.approx(weights[i], rel=1e-12)
        assert 0.5 <= float(weight[i]) < 1.0  # r_w >= r_l, as SPEC.md says


@pytest.mark.parametrize("seed", range(5))
def test_dpo_loss_and_per_pair_match_hand_formula(seed):
    pc, pr, rc, rr, _, _, b1, _ = _random_case(seed + 200)
    margins = [b1 * ((pc[i] - rc[i]) - (pr[i] - rr[i])) for i in range(len(pc))]
    per = [-_log_sigmoid(m) for m in margins]
    got, margin = dpo_per_pair(_t(pc), _t(pr), _t(rc), _t(rr), beta1=b1)
    for i in range(len(pc)):
        assert float(got[i]) == pytest.approx(per[i], rel=1e-12, abs=1e-14)
        assert float(margin[i]) == pytest.approx(margins[i], rel=1e-12, abs=1e-14)
    loss, metrics = dpo_loss(_t(pc), _t(pr), _t(rc), _t(rr), beta1=b1)
    assert float(loss) == pytest.approx(sum(per) / len(per), rel=1e-12)
    assert metrics["wdpo_weight_mean"] == 1.0
    assert metrics["margin_mean"] == pytest.approx(sum(margins) / len(margins), rel=1e-12, abs=1e-14)
    acc = sum(1 for m in margins if m > 0) / len(margins)
    assert metrics["implicit_reward_accuracy"] == pytest.approx(acc, abs=1e-15)


def test_metrics_keys():
    pc, pr, rc, rr, cw, cl, b1, b2 = _random_case(0)
    _, m = wdpo_loss(_t(pc), _t(pr), _t(rc), _t(rr), _t(cw), _t(cl), beta1=b1, beta2=b2)
    assert {"loss", "implicit_reward_accuracy", "wdpo_weight_mean", "margin_mean"} <= set(m)
    _, m = dpo_loss(_t(pc), _t(pr), _t(rc), _t(rr), beta1=b1)
    assert {"loss", "implicit_reward_accuracy", "wdpo_weight_mean", "margin_mean"} <= set(m)
    assert all(isinstance(v, float) for v in m.values())


def test_accuracy_counts_strict_improvement_only():
    # pair 0: delta_w > delta_l; pair 1: equal (not counted); pair 2: worse; pair 3: better
    pc = _t([-1.0, -5.0, -9.0, -2.0])
    pr = _t([-3.0, -5.0, -1.0, -7.0])
    ref = _t([0.0, 0.0, 0.0, 0.0])
    _, m = dpo_loss(pc, pr, ref, ref, beta1=0.1)
    assert m["implicit_reward_accuracy"] == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(4))
def test_wdpo_gradient_matches_analytic(seed):
    pc, pr, rc, rr, cw, cl, b1, b2 = _random_case(seed + 300)
    n = len(pc)
    margins, weights, _ = _expected(pc, pr, rc, rr, cw, cl, b1, b2)
    tpc, tpr = _t(pc, grad=True), _t(pr, grad=True)
    tcw, tcl = _t(cw, grad=True), _t(cl, grad=True)
    loss, _ = wdpo_loss(tpc, tpr, _t(rc), _t(rr), tcw, tcl, beta1=b1, beta2=b2)
    loss.backward()
    # d/dx [-W log sigmoid(beta1 (x - c))] = -W * beta1 * (1 - sigmoid(m)); mean over n pairs
    for i in range(n):
        g = -weights[i] * b1 * (1.0 - _sigmoid(margins[i])) / n
        assert float(tpc.grad[i]) == pytest.approx(g, rel=1e-10, abs=1e-15)
        assert float(tpr.grad[i]) == pytest.approx(-g, rel=1e-10, abs=1e-15)
    # W is a constant: no gradient reaches the rewards
    for r in (tcw, tcl):
        assert r.grad is None or torch.count_nonzero(r.grad) == 0


@pytest.mark.parametrize("seed", range(3))
def test_dpo_gradient_matches_analytic(seed):
    pc, pr, rc, rr, _, _, b1, _ = _random_case(seed + 400)
    n = len(pc)
    tpc, tpr = _t(pc, grad=True), _t(pr, grad=True)
    loss, _ = dpo_loss(tpc, tpr, _t(rc), _t(rr), beta1=b1)
    loss.backward()
    for i in range(n):
        m = b1 * ((pc[i] - rc[i]) - (pr[i] - rr[i]))
        g = -b1 * (1.0 - _sigmoid(m)) / n
        assert float(tpc.grad[i]) == pytest.approx(g, rel=1e-10, abs=1e-15)
        assert float(tpr.grad[i]) == pytest.approx(-g, rel=1e-10, abs=1e-15)


def test_weight_is_detached():
    _, _, weight = wdpo_per_pair(_t([-1.0]), _t([-2.0]), _t([-1.5]), _t([-1.5]),
                                 _t([1.0], grad=True), _t([0.0], grad=True), beta1=0.1, beta2=1.0)
    assert not weight.requires_grad


def test_policy_gets_gradient_when_rewards_require_grad():
    # gradient still flows to the policy even when rewards require grad
    tpc = _t([-3.0], grad=True)
    loss, _ = wdpo_loss(tpc, _t([-4.0]), _t([-3.5]), _t([-3.5]), _t([2.0], grad=True), _t([1.0], grad=True),
                        beta1=0.1, beta2=1.0)
    loss.backward()
    assert tpc.grad is not None and float(tpc.grad[0]) < 0


def test_wdpo_with_unit_weight_equals_dpo():
    pc, pr, rc, rr, _, _, b1, _ = _random_case(7)
    n = len(pc)
    cw, cl = [10.0] * n, [0.0] * n  # positive gaps, beta2 huge -> W == 1 to float precision
    lw, mw = wdpo_loss(_t(pc), _t(pr), _t(rc), _t(rr), _t(cw), _t(cl), beta1=b1, beta2=1e6)
    ld, md = dpo_loss(_t(pc), _t(pr), _t(rc), _t(rr), beta1=b1)
    want = sum(-_log_sigmoid(b1 * ((pc[i] - rc[i]) - (pr[i] - rr[i]))) for i in range(n)) / n
    assert float(ld) == pytest.approx(want, rel=1e-12)
    assert float(lw) == pytest.approx(float(ld), rel=1e-12)
    assert mw["wdpo_weight_mean"] == pytest.approx(1.0, abs=1e-12)
    assert mw["margin_mean"] == pytest.approx(md["margin_mean"], rel=1e-12)


def test_zero_reward_gap_gives_half_weight():
    loss, m = wdpo_loss(_t([-1.0]), _t([-2.0]), _t([-1.0]), _t([-1.0]), _t([0.3]), _t([0.3]),
                        beta1=1.0, beta2=3.0)
    assert m["wdpo_weight_mean"] == pytest.approx(0.5, abs=1e-15)
    assert float(loss) == pytest.approx(-0.5 * _log_sigmoid(1.0), rel=1e-12)


def test_extreme_margin_is_finite():
    # log sigmoid of a very negative margin must not overflow to inf (stable log-sigmoid)
    loss, _ = dpo_loss(_t([-1000.0]), _t([0.0]), _t([0.0]), _t([0.0]), beta1=1.0)
    assert math.isfinite(float(loss))
    assert float(loss) == pytest.approx(1000.0, rel=1e-12)
    loss32, _ = dpo_loss(_t([-1000.0], torch.float32), _t([0.0], torch.float32),
                         _t([0.0], torch.float32), _t([0.0], torch.float32), beta1=1.0)
    assert math.isfinite(float(loss32))
    assert float(loss32) == pytest.approx(1000.0, rel=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_float32_inputs(seed):
    pc, pr, rc, rr, cw, cl, b1, b2 = _random_case(seed + 500)
    f32 = torch.float32
    # compare against the float64 formula applied to the float32-rounded inputs
    r32 = [[float(v) for v in torch.tensor(xs, dtype=f32)] for xs in (pc, pr, rc, rr, cw, cl)]
    _, _, per = _expected(*r32, b1, b2)
    loss, metrics = wdpo_loss(*(_t(xs, f32) for xs in (pc, pr, rc, rr, cw, cl)), beta1=b1, beta2=b2)
    assert loss.dtype == f32
    assert float(loss) == pytest.approx(sum(per) / len(per), rel=1e-4, abs=1e-5)
    per_pair, margin, weight = wdpo_per_pair(*(_t(xs, f32) for xs in (pc, pr, rc, rr, cw, cl)),
                                             beta1=b1, beta2=b2)
    assert per_pair.dtype == margin.dtype == weight.dtype == f32
    for i in range(len(per)):
        assert float(per_pair[i]) == pytest.approx(per[i], rel=1e-4, abs=1e-5)
    ld, _ = dpo_loss(*(_t(xs, f32) for xs in (pc, pr, rc, rr)), beta1=b1)
    assert ld.dtype == f32


def test_float32_logps_with_float64_rewards_keep_policy_dtype():
    per_pair, margin, weight = wdpo_per_pair(
        _t([-1.0], torch.float32), _t([-2.0], torch.float32), _t([-1.0], torch.float32),
        _t([-1.0], torch.float32), _t([1.0]), _t([0.0]), beta1=0.5, beta2=1.0)
    assert weight.dtype == torch.float32 and per_pair.dtype == torch.float32
    assert float(per_pair[0]) == pytest.approx(-_sigmoid(1.0) * _log_sigmoid(0.5), rel=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_bradley_terry_loss(seed):
    rng = random.Random(seed + 600)
    cw = [rng.uniform(-3, 3) for _ in range(9)]
    cl = [rng.uniform(-3, 3) for _ in range(9)]
    want = -sum(_log_sigmoid(a - b) for a, b in zip(cw, cl, strict=True)) / len(cw)
    tw, tl = _t(cw, grad=True), _t(cl, grad=True)
    loss, m = bradley_terry_loss(tw, tl)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-12)
    assert m["loss"] == pytest.approx(want, rel=1e-12)
    assert m["accuracy"] == pytest.approx(sum(1 for a, b in zip(cw, cl, strict=True) if a > b) / len(cw))
    loss.backward()
    for i in range(len(cw)):
        g = -(1.0 - _sigmoid(cw[i] - cl[i])) / len(cw)
        assert float(tw.grad[i]) == pytest.approx(g, rel=1e-10)
        assert float(tl.grad[i]) == pytest.approx(-g, rel=1e-10)
    loss32, _ = bradley_terry_loss(_t(cw, torch.float32), _t(cl, torch.float32))
    assert loss32.dtype == torch.float32
    assert float(loss32) == pytest.approx(want, rel=1e-5)
