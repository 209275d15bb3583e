"""optim.optimizer=rmsprop: torch RMSprop inside megatron's fp32 optimizer. Two optimizer steps follow the
RMSprop update computed here in float64 from the gradients the policy applied (an SGD momentum leaking
into it, or Adam's bias correction, changes the second step and fails this); configurations it cannot run
are refused before any work."""

import pytest
import torch
from dist_utils import run_ranks
from tiny import WDPO, build, inner_optimizer, preference_batch, tiny_config

from optune_nemo.config import ConfigError, load_config, validate
from optune_nemo.runner import resolve

LR, ALPHA, EPS = 1e-3, 0.9, 1e-6


def _two_steps(rank):
    cfg = resolve(tiny_config("optim.optimizer=rmsprop", f"optim.lr={LR}", f"optim.rmsprop_alpha={ALPHA}",
                              f"optim.rmsprop_eps={EPS}", "optim.clip_grad=0", "train.global_batch_size=8",
                              "train.micro_batch_size=4", "precision=fp32"))
    policy = build(cfg)
    params = [p for p in policy.unwrapped_model().parameters()]
    weights, grads = [[p.detach().double().clone() for p in params]], []
    for step in range(2):
        policy.train(preference_batch(policy, 8, seed=step), WDPO, epochs=1, seed=step)
        weights.append([p.detach().double().clone() for p in params])
        grads.append([p.main_grad.detach().double().clone() for p in params])
    inner = inner_optimizer(policy)
    return weights, grads, type(inner).__name__, inner.param_groups[0]["momentum"]


def test_two_rmsprop_steps_match_the_float64_update():
    weights, grads, name, momentum = run_ranks(_two_steps, 1)[0]
    assert name == "RMSprop" and momentum == 0.0
    moved = 0
    for i in range(len(weights[0])):
        p, v = weights[0][i], torch.zeros_like(weights[0][i])
        for step in range(2):
            g = grads[step][i]
            v = ALPHA * v + (1 - ALPHA) * g * g
            p = p - LR * g / (v.sqrt() + EPS)
            torch.testing.assert_close(weights[step + 1][i], p, rtol=0, atol=1e-6)
        moved += int(not torch.equal(weights[2][i], weights[0][i]))
    assert moved > 0


@pytest.mark.parametrize("overrides", [
    ["precision=bf16"], ["precision=fp32", "parallel.use_distributed_optimizer=true"],
    ["precision=fp32", "optim.rmsprop_alpha=1.0"]])
def test_unsupported_rmsprop_setups_are_refused(overrides):
    cfg = load_config(["policy.hf_path=null", "optim.optimizer=rmsprop", *overrides])
    with pytest.raises(ConfigError, match="optim"):
        validate(resolve(cfg))


def test_auto_precision_picks_fp32_for_rmsprop():
    cfg = resolve(load_config(["policy.hf_path=null", "optim.optimizer=rmsprop", "precision=auto"]))
    assert cfg.precision == "fp32" and cfg.parallel.use_distributed_optimizer is False
    validate(cfg)
