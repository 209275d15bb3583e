"""optim.optimizer=adam without Transformer Engine / Apex: megatron's torch AdamW fallback runs torch's
fused kernel (trainable._use_fused_torch_adam). Two optimizer steps follow the AdamW update computed here
in float64 from the gradients the policy applied (bias correction, eps outside the root); a wrong beta,
a missing bias correction or a skipped step fails it."""

import torch
from dist_utils import run_ranks
from tiny import WDPO, build, inner_optimizer, preference_batch, tiny_config

from optune_nemo.runner import resolve

LR, B1, B2, EPS = 1e-3, 0.8, 0.9, 1e-6


def _two_steps(rank):
    cfg = resolve(tiny_config(f"optim.lr={LR}", f"optim.adam_beta1={B1}", f"optim.adam_beta2={B2}",
                              f"optim.adam_eps={EPS}", "optim.weight_decay=0", "optim.clip_grad=0",
                              "train.global_batch_size=8", "train.micro_batch_size=4", "precision=fp32"))
    policy = build(cfg)
    params = list(policy.unwrapped_model().parameters())
    weights, grads = [[p.detach().double().clone() for p in params]], []
    for step in range(2):
        policy.train(preference_batch(policy, 8, seed=step), WDPO, epochs=1, seed=step)
        weights.append([p.detach().double().clone() for p in params])
        grads.append([p.main_grad.detach().double().clone() for p in params])
    group = inner_optimizer(policy).param_groups[0]
    return weights, grads, type(inner_optimizer(policy)).__name__, group["fused"]


def test_two_fused_adam_steps_match_the_float64_update():
    weights, grads, name, fused = run_ranks(_two_steps, 1)[0]
    assert name in ("Adam", "AdamW") and fused is True
    moved = 0
    for i in range(len(weights[0])):
        p, m, v = weights[0][i], torch.zeros_like(weights[0][i]), torch.zeros_like(weights[0][i])
        for t in (1, 2):
            g = grads[t - 1][i]
            m = B1 * m + (1 - B1) * g
            v = B2 * v + (1 - B2) * g * g
            p = p - LR * (m / (1 - B1 ** t)) / ((v / (1 - B2 ** t)).sqrt() + EPS)
            torch.testing.assert_close(weights[t][i], p, rtol=0, atol=1e-6)
        moved += int(not torch.equal(weights[2][i], weights[0][i]))
    assert moved > 0


def _bf16_flags(rank):
    policy = build(resolve(tiny_config("precision=bf16", "parallel.use_distributed_optimizer=true")))
    inner = inner_optimizer(policy)
    return type(inner).__name__, [g["fused"] for g in inner.param_groups]


def test_the_distributed_optimizer_runs_fused_torch_adam_as_well():
    name, flags = run_ranks(_bf16_flags, 1)[0]
    assert name in ("Adam", "AdamW") and flags and all(f is True for f in flags)


def _materialised_first(rank, materialise: bool):
    from tiny import WDPO, build, inner_optimizer, preference_batch, tiny_config

    policy = build(tiny_config("seed=3"))
    inner = inner_optimizer(policy)
    before = sum(len(s) for s in inner.state.values())
    if materialise:
        policy.materialise_optimizer_state()
    allocated = [(float(s["exp_avg"].abs().sum()), float(s["step"])) for s in inner.state.values()]
    policy.train(preference_batch(policy, 4, seed=1), WDPO, epochs=1, seed=0)
    weights = {k: v.detach().clone() for k, v in policy.unwrapped_model().state_dict().items()
               if isinstance(v, torch.Tensor)}
    return before, allocated, len(list(policy.unwrapped_model().parameters())), weights


def test_materialised_optimizer_state_changes_nothing_but_when_memory_is_taken():
    """What a TensorRT-LLM engine needs before it measures free memory: every parameter's Adam state
    allocated (zero moments, step 0), and training then bitwise the same as with lazily created state."""
    (b0, alloc0, _, w_lazy), = run_ranks(_materialised_first, 1, False)
    (b1, alloc1, n_params, w_eager), = run_ranks(_materialised_first, 1, True)
    assert b0 == b1 == 0 and alloc0 == []
    assert len(alloc1) == n_params and all(m == 0.0 and step == 0.0 for m, step in alloc1)
    assert w_lazy.keys() == w_eager.keys() and all(torch.equal(w_lazy[k], w_eager[k]) for k in w_lazy)


def _never_stepped_round_trip(rank, directory):
    from tiny import WDPO, build, preference_batch, tiny_config

    straight = build(tiny_config("seed=3"))
    straight.save_checkpoint(directory)              # an optimizer that never stepped (a no-training control)
    resumed = build(tiny_config("seed=4"))
    resumed.load_checkpoint(directory)
    out = []
    for policy in (straight, resumed):
        policy.train(preference_batch(policy, 4, seed=1), WDPO, epochs=1, seed=0)
        out.append({k: v.detach().clone() for k, v in policy.unwrapped_model().state_dict().items()
                    if isinstance(v, torch.Tensor)})
    return out


def test_a_never_stepped_fp32_optimizer_resumes(tmp_path):
    """Its checkpoint holds no `step` anywhere (torch Adam's __setstate__ used to fail with KeyError: 'step'
    when a fork started from a no-training control); the resumed policy then steps exactly as the original."""
    (a, b), = run_ranks(_never_stepped_round_trip, 1, str(tmp_path / "model"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
