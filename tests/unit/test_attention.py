"""The project's core attention (megatron/attention.py) under every backend and layer spec.

- Packed, prefix-shared pair log-probs equal a plain per-pair forward through `transformers` (float64), for
  each `model.attention_backend` (flex runs forward-only on CPU, which is all log-probs need).
- The core attention on a padded packed row equals a float64 softmax written out from the layout's rule.
- The Transformer Engine spec is built with the project's core attention (megatron's real TE spec provider
  with TE's version check stubbed, since TE is not installed here), never with TE's own causal
  DotProductAttention, which ignores the packed mask; `attention_backend=local` with TE is refused.
"""

from __future__ import annotations

import pytest
import torch
from hf_tiny import hf_response_logprob, save_hf_model_with_tokenizer, token_pairs

from optune_nemo.config import ConfigError, ModelConfig, load_config, validate

BACKENDS = ["flex", "sdpa", "local"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_hf_model_with_tokenizer("llama_untied", tmp_path_factory.mktemp("attn") / "hf", seed=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_pair_logprobs_equal_transformers(hf_dir, backend):
    """Three pairs per packed row (micro_batch_size=3): a rejected response that saw its chosen sibling, or a
    pair that saw an earlier one, changes its log-prob by far more than the tolerance."""
    from transformers import AutoModelForCausalLM

    from optune_nemo.megatron.attention import PackedCoreAttention
    from optune_nemo.runner import resolve
    from optune_nemo.train import build_policy_parts

    cfg = resolve(load_config([f"policy.hf_path={hf_dir}", "model.seq_length=64", "eval.num_prompts=0",
                               "precision=fp32", "train.micro_batch_size=3", "train.global_batch_size=6",
                               "train.shuffle=false", f"model.attention_backend={backend}"]))
    policy = build_policy_parts(cfg).policy
    cores = [layer.self_attention.core_attention for layer in policy.unwrapped_model().decoder.layers]
    assert all(isinstance(c, PackedCoreAttention) for c in cores) == (backend != "local")
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64).eval()
    prompts, chosen, rejected = token_pairs(7, hf.config.vocab_size, seed=11)
    got_c, got_r = policy.pair_logprobs(prompts, chosen, rejected, seed=0)
    for i in range(len(prompts)):
        for got, response in ((got_c[i], chosen[i]), (got_r[i], rejected[i])):
            ref = hf_response_logprob(hf, prompts[i], response)
            assert abs(got.item() - ref) < 1e-4 * max(1.0, abs(ref)), (backend, i, got.item(), ref)


def _reference_attention(q, k, v, group, branch):
    """float64 softmax(q k^T / sqrt(d)) v per head, the mask written out token by token: i sees j iff same
    group, j <= i, and j in the prompt or in i's branch; padding (group -1) sees itself only."""
    S, H, D = q.shape[0], q.shape[2], q.shape[3]
    rep = H // k.shape[2]
    out = torch.zeros(S, H, D, dtype=torch.float64)
    for i in range(S):
        if group[i] < 0:
            seen = [i]
        else:
            seen = [j for j in range(i + 1) if group[j] == group[i] and branch[j] in (0, branch[i])]
        for h in range(H):
            qi = q[i, 0, h].double()
            keys = torch.stack([k[j, 0, h // rep].double() for j in seen])
            vals = torch.stack([v[j, 0, h // rep].double() for j in seen])
            w = torch.softmax(keys @ qi / D ** 0.5, dim=0)
            out[i, h] = w @ vals
    return out.reshape(S, 1, H * D)


@pytest.mark.parametrize("backend", ["flex", "sdpa", "dense"])
def test_core_attention_on_a_padded_row(backend):
    from megatron.core.transformer import TransformerConfig

    from optune_nemo.megatron.attention import PackedCoreAttention
    from optune_nemo.megatron.packing import pack_groups
    from optune_nemo.megatron.parallel import init_distributed

    init_distributed(1, 1)
    batch = pack_groups([([5, 6, 7], [[8, 9], [10, 11, 12]]), ([4], [[3]]), ([1, 2], [[3], [4, 5]])],
                        pad_id=0, length=20)
    S, H, G, D = batch.length, 6, 2, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(S, 1, n, D, generator=g) for n in (H, G, G))
    config = TransformerConfig(num_layers=1, hidden_size=H * D, num_attention_heads=H, num_query_groups=G,
                               use_cpu_initialization=True, attention_dropout=0.0)
    core = PackedCoreAttention(config, 1, backend="sdpa" if backend == "dense" else backend).eval()
    mask = batch.mask_B1SS if backend == "dense" else batch.segments
    with torch.no_grad():
        got = core(q, k, v, mask)
    ref = _reference_attention(q, k, v, batch.segments.group_BS[0].tolist(), batch.segments.branch_BS[0].tolist())
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():    # no mask: plain causal (the reward model, full-sequence forwards)
        causal = core(q, k, v, None)
    one = [0] * S
    torch.testing.assert_close(causal.double(), _reference_attention(q, k, v, one, one), atol=1e-5, rtol=1e-5)


def test_flex_refuses_to_train_on_cpu():
    from megatron.core.transformer import TransformerConfig

    from optune_nemo.megatron.attention import PackedCoreAttention
    from optune_nemo.megatron.packing import pack_groups
    from optune_nemo.megatron.parallel import init_distributed

    init_distributed(1, 1)
    batch = pack_groups([([5, 6], [[7], [8]])], pad_id=0)
    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                               use_cpu_initialization=True, attention_dropout=0.0)
    q = torch.randn(batch.length, 1, 4, 8, requires_grad=True)
    k, v = torch.randn(batch.length, 1, 2, 8), torch.randn(batch.length, 1, 2, 8)
    with pytest.raises(ConfigError, match="model.attention_backend: flex has no backward on CPU"):
        PackedCoreAttention(config, 1, backend="flex")(q, k, v, batch.segments)


@pytest.fixture
def te_spec_provider(monkeypatch):
    """megatron's real TE spec provider, usable without TE: only its TE version checks are stubbed."""
    from megatron.core.extensions import transformer_engine_spec_provider as provider
    from megatron.core.models.gpt import gpt_layer_specs

    from optune_nemo.megatron import model

    monkeypatch.setattr(provider, "is_te_min_version", lambda *a, **k: True)
    monkeypatch.setattr(gpt_layer_specs, "TESpecProvider", provider.TESpecProvider, raising=False)
    monkeypatch.setattr(model, "HAVE_TE", True)


@pytest.mark.parametrize("backend", ["auto", "flex", "sdpa"])
def test_te_spec_uses_the_projects_core_attention(te_spec_provider, backend):
    import functools

    from megatron.core.extensions.transformer_engine import TEDotProductAttention, TELayerNormColumnParallelLinear
    from megatron.core.transformer.enums import AttnMaskType

    from optune_nemo.megatron.attention import PackedCoreAttention
    from optune_nemo.megatron.model import layer_spec

    spec = layer_spec(ModelConfig(transformer_impl="transformer_engine", attention_backend=backend), init_seed=1)
    attn = spec.submodules.self_attention
    core = attn.submodules.core_attention
    # the silently wrong path: TE's own core attention, built causal, ignores the packed mask
    assert not (core is TEDotProductAttention and attn.params.get("attn_mask_type") == AttnMaskType.causal)
    assert isinstance(core, functools.partial) and core.func is PackedCoreAttention
    assert core.keywords == {"backend": backend}
    # TE's fused norm + QKV linear (FP8 GEMMs) stay
    assert attn.submodules.linear_qkv is TELayerNormColumnParallelLinear


def test_local_attention_backend_is_refused_with_te(te_spec_provider):
    from optune_nemo.megatron.model import layer_spec

    with pytest.raises(ConfigError, match="model.attention_backend"):
        layer_spec(ModelConfig(transformer_impl="transformer_engine", attention_backend="local"))
    cfg = load_config(["policy.hf_path=null", "model.transformer_impl=transformer_engine",
                       "model.attention_backend=local"])
    with pytest.raises(ConfigError, match="model.attention_backend: local"):
        validate(cfg, world_size=1)


def test_local_spec_uses_the_projects_core_attention_unless_local():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from optune_nemo.megatron.attention import PackedCoreAttention
    from optune_nemo.megatron.model import layer_spec

    core = layer_spec(ModelConfig(attention_backend="sdpa")).submodules.self_attention.submodules.core_attention
    assert core.func is PackedCoreAttention
    local = layer_spec(ModelConfig(attention_backend="local")).submodules.self_attention.submodules.core_attention
    assert local is DotProductAttention
