"""Preference losses against independent float64 formulas from docs/algorithm.md (paper eqs. 1, 5, 6)."""

import math
import random

import pytest
import torch

from optune_nemo.losses.bradley_terry import bradley_terry_loss
from optune_nemo.losses.dpo import dpo_loss, dpo_per_pair
from optune_nemo.losses.wdpo import wdpo_loss, wdpo_per_pair


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
        assert 0.5 <= float(weight[i]) < 1.0  # r_w >= r_l, as docs/algorithm.md says


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
    assert "wdpo_weight_mean" not in metrics          # DPO has no reward-gap weight
    assert metrics["margin_mean"] == pytest.approx(sum(margins) / len(margins), rel=1e-12, abs=1e-14)
    acc = sum(1 for m in margins if m > 0) / len(margins)
    assert metrics["implicit_reward_accuracy"] == pytest.approx(acc, abs=1e-15)


def test_metrics_keys():
    pc, pr, rc, rr, cw, cl, b1, b2 = _random_case(0)
    _, m = wdpo_loss(_t(pc), _t(pr), _t(rc), _t(rr), _t(cw), _t(cl), beta1=b1, beta2=b2)
    assert {"loss", "implicit_reward_accuracy", "wdpo_weight_mean", "margin_mean"} <= set(m)
    _, m = dpo_loss(_t(pc), _t(pr), _t(rc), _t(rr), beta1=b1)
    assert {"loss", "implicit_reward_accuracy", "margin_mean"} <= set(m)
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


# --------------------------------------------------------------------------- the protocol and registry

from optune_nemo.config import ConfigError, LossConfig  # noqa: E402
from optune_nemo.losses import LOSSES, PairTensors, build_loss, check  # noqa: E402


def _pairs(pc, pr, rc, rr, cw, cl, grad=False):
    return PairTensors(_t(pc, grad=grad), _t(pr, grad=grad), _t(rc), _t(rr), _t(cw), _t(cl))


def test_registry_has_the_four_losses():
    assert {"dpo", "wdpo", "ipo", "cdpo"} <= set(LOSSES.names())
    with pytest.raises(ConfigError, match="loss.name: must be one of"):
        build_loss(LossConfig(name="simpo"))


def test_the_family_check_names_the_key_and_the_losses():
    with pytest.raises(ConfigError) as err:
        check(LossConfig(name="simpo"))
    assert str(err.value) == "loss.name: must be one of cdpo, dpo, ipo, wdpo (got 'simpo')"
    check(LossConfig(name="no_such_module_xyz:Hinge"))      # imported when built, not when checked
    for name in LOSSES.names():
        check(LossConfig(name=name))


def test_only_wdpo_reports_a_weight():
    """The DPO family's common metrics come from the shared helper; the weight is wDPO's own."""
    pairs = PairTensors(_t([-1.0, -2.0]), _t([-2.0, -1.0]), _t([-1.5, -1.5]), _t([-1.5, -1.5]), _t([1.0, 0.0]),
                        _t([0.0, 0.0]))
    for name in LOSSES.names():
        _, metrics = build_loss(LossConfig(name=name))(pairs)
        want = {"margin_mean", "implicit_reward_accuracy"} | ({"wdpo_weight_mean"} if name == "wdpo" else set())
        assert set(metrics) == want, name


@pytest.mark.parametrize("seed", range(3))
def test_registered_wdpo_and_dpo_equal_their_formulas(seed):
    pc, pr, rc, rr, cw, cl, b1, b2 = _random_case(seed + 300)
    margins, weights, per = _expected(pc, pr, rc, rr, cw, cl, b1, b2)
    loss, metrics = build_loss(LossConfig(name="wdpo", beta1=b1, beta2=b2))(_pairs(pc, pr, rc, rr, cw, cl))
    assert loss.tolist() == pytest.approx(per, rel=1e-12)
    assert metrics["wdpo_weight_mean"].tolist() == pytest.approx(weights, rel=1e-12)
    loss, metrics = build_loss(LossConfig(name="dpo", beta1=b1))(_pairs(pc, pr, rc, rr, cw, cl))
    assert loss.tolist() == pytest.approx([-_log_sigmoid(m) for m in margins], rel=1e-12)
    assert metrics["margin_mean"].tolist() == pytest.approx(margins, rel=1e-12, abs=1e-14)
    assert metrics["implicit_reward_accuracy"].tolist() == [1.0 if m > 0 else 0.0 for m in margins]


@pytest.mark.parametrize("seed", range(3))
def test_ipo_matches_formula_and_gradient(seed):
    """IPO: (h - 1/(2 tau))^2 with h = delta_w - delta_l; dL/d logp_w = 2 (h - 1/(2 tau))."""
    pc, pr, rc, rr, cw, cl, tau, _ = _random_case(seed + 400)
    hs = [(pc[i] - rc[i]) - (pr[i] - rr[i]) for i in range(len(pc))]
    pairs = _pairs(pc, pr, rc, rr, cw, cl, grad=True)
    loss, metrics = build_loss(LossConfig(name="ipo", beta1=tau))(pairs)
    assert loss.tolist() == pytest.approx([(h - 1 / (2 * tau)) ** 2 for h in hs], rel=1e-12)
    assert metrics["margin_mean"].tolist() == pytest.approx([tau * h for h in hs], rel=1e-12, abs=1e-14)
    loss.sum().backward()
    for i, h in enumerate(hs):
        assert float(pairs.policy_chosen_logps.grad[i]) == pytest.approx(2 * (h - 1 / (2 * tau)), rel=1e-10)
        assert float(pairs.policy_rejected_logps.grad[i]) == pytest.approx(-2 * (h - 1 / (2 * tau)), rel=1e-10)


def test_ipo_minimum_is_at_the_target_gap():
    tau = 0.25
    target = 1 / (2 * tau)
    pairs = PairTensors(_t([target]), _t([0.0]), _t([0.0]), _t([0.0]), _t([1.0]), _t([0.0]))
    assert float(build_loss(LossConfig(name="ipo", beta1=tau))(pairs)[0]) == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_cdpo_matches_formula_and_gradient(seed):
    """cDPO: -(1-eps) log s(m) - eps log s(-m); dL/dm = -(1-eps) (1 - s(m)) + eps s(m)."""
    pc, pr, rc, rr, cw, cl, b1, _ = _random_case(seed + 500)
    eps = [0.0, 0.1, 0.3][seed]
    margins = [b1 * ((pc[i] - rc[i]) - (pr[i] - rr[i])) for i in range(len(pc))]
    pairs = _pairs(pc, pr, rc, rr, cw, cl, grad=True)
    loss, _ = build_loss(LossConfig(name="cdpo", beta1=b1, label_smoothing=eps))(pairs)
    want = [-(1 - eps) * _log_sigmoid(m) - eps * _log_sigmoid(-m) for m in margins]
    assert loss.tolist() == pytest.approx(want, rel=1e-12)
    loss.sum().backward()
    for i, m in enumerate(margins):
        dm = -(1 - eps) * (1 - _sigmoid(m)) + eps * _sigmoid(m)
        assert float(pairs.policy_chosen_logps.grad[i]) == pytest.approx(b1 * dm, rel=1e-9, abs=1e-15)


def test_cdpo_with_zero_smoothing_is_dpo():
    pc, pr, rc, rr, cw, cl, b1, _ = _random_case(7)
    c = build_loss(LossConfig(name="cdpo", beta1=b1, label_smoothing=0.0))(_pairs(pc, pr, rc, rr, cw, cl))[0]
    d = build_loss(LossConfig(name="dpo", beta1=b1))(_pairs(pc, pr, rc, rr, cw, cl))[0]
    assert torch.equal(c, d)


def test_a_loss_outside_the_package_by_import_path(tmp_path, monkeypatch):
    """A third-party loss is one file: a class with from_config and __call__, named module:Class."""
    (tmp_path / "my_loss_for_optune_tests.py").write_text(
        "from dataclasses import dataclass\n"
        "@dataclass\n"
        "class Hinge:\n"
        "    beta1: float\n"
        "    @classmethod\n"
        "    def from_config(cls, cfg):\n"
        "        return cls(cfg.beta1)\n"
        "    def __call__(self, p):\n"
        "        m = self.beta1 * ((p.policy_chosen_logps - p.ref_chosen_logps)\n"
        "                          - (p.policy_rejected_logps - p.ref_rejected_logps))\n"
        "        return (1 - m).clamp(min=0), {'margin_mean': m.detach()}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    loss = build_loss(LossConfig(name="my_loss_for_optune_tests:Hinge", beta1=0.5))
    per, metrics = loss(PairTensors(_t([1.0]), _t([0.0]), _t([0.0]), _t([0.0]), _t([1.0]), _t([0.0])))
    assert per.tolist() == [0.5] and metrics["margin_mean"].tolist() == [0.5]
    with pytest.raises(ConfigError, match="loss.name: cannot import"):
        build_loss(LossConfig(name="no_such_module_xyz:Hinge"))
