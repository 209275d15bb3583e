"""The gradient the policy applies is the gradient of the MEAN wDPO loss over the global batch, checked
against an independent reference: autograd through `transformers`' plain float64 forward of the same
weights (no megatron). Covered: micro-batching (several micro-batches per step), data parallelism (DP=2),
and the masked dummy pairs that fill a rank's short share. Gradient clipping is off. A loss summed instead
of averaged (or averaged per micro-batch or per rank) is off by a factor of 2 or more and fails."""

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_ranks

pytestmark = pytest.mark.multiproc

BETA1, BETA2 = 0.5, 2.0


def _pairs(n: int, vocab: int, seed: int = 5):
    g = torch.Generator().manual_seed(seed)

    def seq(lo, hi):
        return torch.randint(3, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    prompts = [seq(3, 9) for _ in range(n)]
    chosen, rejected = [seq(1, 7) for _ in range(n)], [seq(1, 7) for _ in range(n)]
    ref_c, ref_r = torch.randn(n, generator=g) - 20, torch.randn(n, generator=g) - 20
    rw_c, rw_r = torch.rand(n, generator=g), torch.rand(n, generator=g)
    return prompts, chosen, rejected, ref_c, ref_r, rw_c, rw_r


def _megatron_gradient(rank, hf_dir, overrides, n):
    """One optimizer step of the policy on n pairs; returns its applied gradient under HF names."""
    from optune_nemo.config import load_config
    from optune_nemo.interfaces import PreferenceBatch
    from optune_nemo.losses.wdpo import WDPO
    from optune_nemo.megatron.hf_export import megatron_to_hf_tensors
    from optune_nemo.megatron.hf_import import global_layer_numbers, read_hf_config
    from optune_nemo.runner import resolve
    from optune_nemo.train import build_policy_parts

    cfg = resolve(load_config([f"policy.hf_path={hf_dir}", "model.seq_length=64", "eval.num_prompts=0",
                               "train.shuffle=false", "optim.clip_grad=0", "optim.warmup_ratio=0",
                               "optim.lr=1e-3", "precision=fp32", *overrides]))
    parts = build_policy_parts(cfg)
    policy = parts.policy
    vocab = read_hf_config(hf_dir).vocab_size
    prompts, chosen, rejected, ref_c, ref_r, rw_c, rw_r = _pairs(n, vocab)
    batch = PreferenceBatch(prompts, chosen, rejected, ref_c, ref_r, rw_c, rw_r)
    steps = policy.train(batch, WDPO(beta1=BETA1, beta2=BETA2), epochs=1, seed=0)
    assert len(steps) == 1 and steps[0]["num_pairs"] == n
    model = policy.unwrapped_model()
    grads = {}
    for name, p in model.named_parameters():
        grads.update(megatron_to_hf_tensors(name, [p.main_grad.detach().double().clone()], cfg.model,
                                            vocab_size=vocab, layer_map=global_layer_numbers(model)))
    return grads, steps[0]["loss"]


def _reference_gradient(hf_dir, n):
    """float64 autograd of -mean_i W_i log sigmoid(beta1 * (delta_w - delta_l)) through transformers."""
    from transformers import AutoModelForCausalLM

    from optune_nemo.megatron.hf_import import read_hf_config

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64).train()
    vocab = read_hf_config(hf_dir).vocab_size
    prompts, chosen, rejected, ref_c, ref_r, rw_c, rw_r = _pairs(n, vocab)

    def logp(prompt, response):
        ids = torch.tensor([prompt + response])
        logits = model(ids).logits[0].double()
        lp = F.log_softmax(logits, -1)
        return sum(lp[len(prompt) - 1 + k, t] for k, t in enumerate(response))

    total = 0.0
    for i in range(n):
        margin = BETA1 * ((logp(prompts[i], chosen[i]) - float(ref_c[i]))
                          - (logp(prompts[i], rejected[i]) - float(ref_r[i])))
        weight = torch.sigmoid(BETA2 * (rw_c[i].double() - rw_r[i].double()))
        total = total - weight * F.logsigmoid(margin)
    loss = total / n
    loss.backward()
    return {k: p.grad.detach().clone() for k, p in model.named_parameters()}, loss.item()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from hf_tiny import save_hf_model_with_tokenizer

    return save_hf_model_with_tokenizer("llama_tied", tmp_path_factory.mktemp("hf") / "m", seed=3)


@pytest.mark.parametrize("world,overrides,n", [
    (1, ["train.global_batch_size=8", "train.micro_batch_size=2"], 7),    # 4 micro-batches, 1 dummy pair
    (2, ["train.global_batch_size=8", "train.micro_batch_size=2"], 7),    # DP=2: 2 micro-batches each, 1 dummy
    (2, ["train.global_batch_size=8", "train.micro_batch_size=4"], 5),    # DP=2: 1 micro-batch each, 3 dummies
], ids=["mb4-dp1", "mb2-dp2", "mb1-dp2-dummies"])
def test_applied_gradient_is_that_of_the_mean_loss(hf_dir, world, overrides, n):
    ref, ref_loss = _reference_gradient(hf_dir, n)
    results = run_ranks(_megatron_gradient, world, str(hf_dir), overrides, n)
    for got, loss in results:                       # every data-parallel rank applies the same gradient
        assert abs(loss - ref_loss) < 1e-5 * max(1.0, abs(ref_loss)), (loss, ref_loss)
        assert set(got) == set(ref) - {"lm_head.weight"}
        for name, g in got.items():
            r = ref[name]
            scale = r.norm().item()
            assert scale > 0, name
            assert (g - r).norm().item() < 1e-4 * scale, (name, (g - r).norm().item() / scale)
            # a sum instead of a mean (or a mean per micro-batch / per rank) would be this far off
            assert (g - n * r).norm().item() > 0.5 * n * scale
