"""Tiny models and data shared by the tests (module-level so multi-rank workers can import them)."""

from __future__ import annotations

import torch

from optune_nemo.config import load_config
from optune_nemo.interfaces import PreferenceBatch
from optune_nemo.losses.wdpo import WDPO as _WDPO

VOCAB = 300
TINY = ["policy.hf_path=null", "eval.num_prompts=0", "precision=fp32", "model.num_layers=2", "model.hidden_size=64",
        "model.ffn_hidden_size=96",
        "model.num_attention_heads=4", "model.num_query_groups=2", "model.init_method_std=0.2",
        "model.seq_length=64", "optim.warmup_ratio=0.0", "optim.lr=0.002", "train.shuffle=false",
        # Adam with eps 1e-8 turns fp32 rounding in near-zero gradients into +-lr updates, so two
        # equal computations in different layouts drift apart after one step; 1e-4 damps that
        "optim.adam_eps=1e-4"]


def tiny_config(*overrides: str):
    return load_config([*TINY, *overrides])


def random_pairs(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def seq(lo, hi):
        return torch.randint(1, VOCAB, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    prompts = [seq(3, 10) for _ in range(n)]
    return prompts, [seq(1, 8) for _ in range(n)], [seq(1, 8) for _ in range(n)]


def preference_batch(policy, n: int, seed: int = 0) -> PreferenceBatch:
    prompts, chosen, rejected = random_pairs(n, seed)
    ref = policy.sequence_logprobs(prompts + prompts, chosen + rejected)
    g = torch.Generator().manual_seed(seed + 1)
    return PreferenceBatch(prompts, chosen, rejected, ref[:n], ref[n:],
                           torch.rand(n, generator=g), torch.rand(n, generator=g))


WDPO = _WDPO(beta1=0.5, beta2=2.0)


def build(cfg):
    from optune_nemo.megatron.megatron_policy import build_policy
    from optune_nemo.megatron.parallel import init_distributed

    d = init_distributed(cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size)
    return build_policy(cfg, vocab_size=VOCAB, pad_token_id=0, dist=d)


def inner_optimizer(policy) -> torch.optim.Optimizer:
    """The torch optimizer inside megatron's wrapper (the first chunk's, behind a ChainedOptimizer)."""
    opt = policy.optimizer
    return opt.chained_optimizers[0].optimizer if hasattr(opt, "chained_optimizers") else opt.optimizer
