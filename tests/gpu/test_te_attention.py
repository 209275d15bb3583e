"""On a CUDA GPU with Transformer Engine (opt in: `pytest -m gpu tests/gpu`): the TE layer spec runs the
project's core attention, and its packed, prefix-shared pair log-probs equal a plain per-pair forward
through `transformers` (float64), for each attention backend. Under TE's own core attention (causal mask
type, the packed mask ignored) a rejected response would see its chosen sibling and fail this."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

te = pytest.importorskip("transformer_engine")

from hf_tiny import hf_response_logprob, token_pairs  # noqa: E402  (after the skip: TE first)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from hf_tiny import save_hf_model_with_tokenizer

    return save_hf_model_with_tokenizer("llama_untied", tmp_path_factory.mktemp("te_attn") / "hf", seed=3)


@pytest.mark.parametrize("backend", ["flex", "sdpa"])
def test_te_spec_packed_pair_logprobs_equal_transformers(hf_dir, backend):
    from megatron.core.extensions.transformer_engine import TEDotProductAttention
    from transformers import AutoModelForCausalLM

    from optune_nemo.config import load_config
    from optune_nemo.megatron.attention import PackedCoreAttention
    from optune_nemo.runner import resolve
    from optune_nemo.train import build_policy_parts

    cfg = resolve(load_config([f"policy.hf_path={hf_dir}", "model.seq_length=64", "eval.num_prompts=0",
                               "precision=fp32", "train.micro_batch_size=3", "train.global_batch_size=6",
                               "train.shuffle=false", "model.transformer_impl=transformer_engine",
                               f"model.attention_backend={backend}"]))
    policy = build_policy_parts(cfg).policy
    for layer in policy.unwrapped_model().decoder.layers:
        core = layer.self_attention.core_attention
        assert isinstance(core, PackedCoreAttention) and not isinstance(core, TEDotProductAttention)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64).eval()
    prompts, chosen, rejected = token_pairs(7, hf.config.vocab_size, seed=11)
    got_c, got_r = policy.pair_logprobs(prompts, chosen, rejected, seed=0)
    for i in range(len(prompts)):
        for got, response in ((got_c[i], chosen[i]), (got_r[i], rejected[i])):
            ref = hf_response_logprob(hf, prompts[i], response)
            # TE's fp32 GEMMs may run in TF32 on the GPU: a looser bound than the CPU test's 1e-4
            assert abs(got.item() - ref) < 2e-3 * max(1.0, abs(ref)), (backend, i, got.item(), ref)
