"""TensorRT-LLM engine on a GPU (opt in: `pytest -m trtllm tests/gpu`, inside the NGC container built
from the Dockerfile; docs/generation.md). Greedy output equals the torch engine's on SmolLM2, and a
refit after a training step changes the engine's output exactly as it changes the policy's."""

import pytest
import torch

pytestmark = [pytest.mark.trtllm, pytest.mark.gpu]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pytest.importorskip("tensorrt_llm")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from optune_nemo.config import load_config
    from optune_nemo.data.hf_tokenizer import HFTokenizer
    from optune_nemo.distributed import init_distributed
    from optune_nemo.generation.torch_engine import TorchEngine
    from optune_nemo.generation.trtllm_engine import TrtllmEngine
    from optune_nemo.policy.megatron_policy import build_policy
    from optune_nemo.policy.pretrained import load_pretrained_weights, pretrained_model_config, resolve_hf_dir

    dist = init_distributed(1, 1)
    hf_dir = resolve_hf_dir("smollm2", tmp_path_factory.mktemp("trt"), rank=0)
    cfg = load_config(["policy.hf_path=smollm2", "model.seq_length=256", "generation.engine=trtllm"])
    cfg.model = pretrained_model_config(cfg, hf_dir)
    tok = HFTokenizer.from_pretrained(hf_dir)
    policy = build_policy(cfg, vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id, dist=dist)
    load_pretrained_weights(policy, hf_dir)
    torch_engine = TorchEngine(policy.unwrapped_model(), decode=tok.decode, dist=dist, vocab_size=tok.vocab_size,
                               batch_size=8, max_sequence_length=256)
    trt = TrtllmEngine.build(str(hf_dir), tokenizer=tok, policy=policy, max_seq_len=256)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}])
               for q in ("What is 17 + 25?", "Name a primary color.", "Compute 12 times 7.")]
    return policy, torch_engine, trt, prompts, tok


def _greedy(engine, prompts, tok):
    from optune_nemo.types import SamplingParams

    params = SamplingParams(n=1, temperature=0, max_new_tokens=16, stop_token_ids=tok.stop_token_ids)
    return [s[0].token_ids for s in engine.generate(prompts, params, keys=list(range(len(prompts))))]


def test_greedy_equals_torch_engine(setup):
    policy, torch_engine, trt, prompts, tok = setup
    trt.begin_generation()
    assert _greedy(trt, prompts, tok) == _greedy(torch_engine, prompts, tok)


def test_refit_follows_the_policy(setup):
    policy, torch_engine, trt, prompts, tok = setup
    with torch.no_grad():
        for p in policy.unwrapped_model().parameters():
            p.mul_(1.01)
    trt.end_generation()
    trt.begin_generation()                 # wake + in-memory refit
    assert _greedy(trt, prompts, tok) == _greedy(torch_engine, prompts, tok)
