"""Policy training throughput and MFU: wDPO optimizer steps of the megatron policy on synthetic pairs.

    .venv/bin/python bench/training.py --preset llama-1b --precision bf16 --steps 10      # one GPU
    .venv/bin/python bench/training.py --preset smollm2 --precision bf16 --steps 5
    .venv/bin/python bench/training.py --preset tiny --steps 3                            # CPU smoke run
    python bench/training.py --vs-trl --store RUN/checkpoints/iter_000000/rollouts.parquet  # bench/vs_trl.py

Synthetic pairs: a prompt of --prompt-tokens and two responses of --response-tokens each, random token
ids, random weights of the preset's shape. Each optimizer step trains --pairs-per-step pairs (packed,
prefix-shared micro-batches of --micro-batch-size pairs, or filled up to --micro-batch-tokens packed
tokens: optune_nemo/megatron/packing.py). The first
--warmup steps are not timed. Prints one JSON object with:
  - `pairs_per_s`, `tokens_per_s` (tokens actually run: prompt + both responses per pair);
  - `model_tflops_per_s` / `mfu`: megatron's FLOP formula (megatron/training/training.py
    `num_floating_point_operations`: SwiGLU MLP, GQA projections, causal attention counted at half of
    s^2, the LM head on every position, no embedding) applied to the conventional DPO work, two
    sequences of prompt + response per pair; prefix sharing and the response-only LM head make the run
    do less than that, so this MFU can exceed what the hardware executes;
  - `executed_tflops_per_s` / `executed_mfu`: the same formula applied to what the packed run executes
    (prompt + both responses per pair, attention over prompt + own response, LM head on response tokens);
  against --peak-tflops (default: the H100 SXM dense bf16 figure, 989; give the right one for the
  machine).
--attention and --transformer-impl set model.attention_backend and model.transformer_impl (docs/models.md);
--precision fp8 needs a CUDA GPU with Transformer Engine (and --transformer-impl transformer_engine).
--profile runs one more step under torch.profiler and prints its top kernels (self time) to stderr, and
adds them to the JSON as `profile_top`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

PRESETS = {
    # Llama-3.2-1B's shape: 16 layers, hidden 2048, SwiGLU 8192, 32 heads / 8 KV heads, vocab 128256, tied
    "llama-1b": (["model.num_layers=16", "model.hidden_size=2048", "model.ffn_hidden_size=8192",
                  "model.num_attention_heads=32", "model.num_query_groups=8", "model.seq_length=2048",
                  "model.rotary_base=500000", "model.untie_embeddings_and_output_weights=false"], 128256),
    # SmolLM2-135M-Instruct's shape (the default run's model)
    "smollm2": (["model.num_layers=30", "model.hidden_size=576", "model.ffn_hidden_size=1536",
                 "model.num_attention_heads=9", "model.num_query_groups=3", "model.seq_length=1024",
                 "model.rotary_base=100000", "model.untie_embeddings_and_output_weights=false"], 49152),
    "tiny": (["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=176",
              "model.num_attention_heads=4", "model.num_query_groups=2", "model.seq_length=128"], 300),
}


def megatron_flops(m, *, tokens: int, attended: int, head_tokens: int, vocab: int) -> float:
    """Forward + backward FLOPs of `tokens` tokens that each attend (causally) over sequences of length
    `attended`, with the LM head on `head_tokens` of them: megatron's num_floating_point_operations terms
    (12 = 3 passes x 2 GEMMs per block x 2 FLOPs per multiply-add; causal attention at half of s^2)."""
    kv = m.kv_channels or m.hidden_size // m.num_attention_heads
    q_ratio = kv * m.num_attention_heads / m.hidden_size
    mlp = 12 * m.num_layers * m.hidden_size * m.ffn_hidden_size * 1.5
    attn = 12 * m.num_layers * m.hidden_size ** 2 * q_ratio * (
        1 + m.num_query_groups / m.num_attention_heads + attended / m.hidden_size * 0.5)
    return tokens * (mlp + attn) + head_tokens * 6 * m.hidden_size * vocab


def profile_step(run, sync, top: int = 12) -> list[dict]:
    """One call of `run` under torch.profiler: its `top` kernels / ops by self time (device time on a GPU),
    as a table on stderr and as a list of {name, calls, self_ms}."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        run()
        sync()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:top]
    print(prof.key_averages().table(sort_by=key, row_limit=top), file=sys.stderr)
    return [{"name": e.key, "calls": e.count, "self_ms": round(getattr(e, key) / 1e3, 3)} for e in events]


def parser() -> argparse.ArgumentParser:
    """The command line (the smoke test parses bench/gpu_session.sh's commands with it)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp8"], default="fp32")
    ap.add_argument("--attention", choices=["auto", "flex", "sdpa", "local"], default="auto")
    ap.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default="local")
    ap.add_argument("--profile", action="store_true", help="profile one extra step: top kernels to stderr")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--pairs-per-step", type=int, default=16)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--micro-batch-tokens", type=int, default=0,
                    help="train.micro_batch_tokens: micro-batches filled up to N packed tokens (0: off)")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="default: a quarter of model.seq_length")
    ap.add_argument("--response-tokens", type=int, default=None, help="default: a quarter of model.seq_length")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    return ap


def main(argv=None) -> dict:
    args = parser().parse_args(argv)

    import torch

    from optune_nemo.config import ConfigError, load_config, validate_train
    from optune_nemo.interfaces import PreferenceBatch
    from optune_nemo.losses.wdpo import WDPO
    from optune_nemo.megatron.model import HAVE_TE
    from optune_nemo.runner import resolve
    from optune_nemo.runtime.hardware import machine_info
    from optune_nemo.train import build_policy_parts

    if args.precision == "fp8" and not (torch.cuda.is_available() and HAVE_TE):
        print("bench/training.py: --precision fp8 needs a CUDA GPU with Transformer Engine", file=sys.stderr)
        raise SystemExit(2)
    shape, vocab = PRESETS[args.preset]
    over = [*shape, "policy.hf_path=null", "eval.num_prompts=0", f"precision={args.precision}",
            f"model.attention_backend={args.attention}", f"model.transformer_impl={args.transformer_impl}",
            f"train.global_batch_size={args.pairs_per_step}", f"train.micro_batch_size={args.micro_batch_size}",
            f"train.micro_batch_tokens={args.micro_batch_tokens}", "optim.warmup_ratio=0.0", "train.shuffle=false"]
    try:
        cfg = resolve(load_config(over))
        validate_train(cfg.train, 1)
    except ConfigError as e:        # --micro-batch-size / --micro-batch-tokens / --pairs-per-step out of range
        print(f"bench/training.py: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    m = cfg.model
    P = args.prompt_tokens or m.seq_length // 4
    R = args.response_tokens or m.seq_length // 4
    if P < 1 or R < 1 or P + R > m.seq_length:
        print(f"bench/training.py: --prompt-tokens {P} + --response-tokens {R} must be positive and fit "
              f"model.seq_length {m.seq_length}", file=sys.stderr)
        raise SystemExit(2)

    class _Tok:                     # the policy needs only the vocabulary size and a pad id
        vocab_size, pad_token_id = vocab, 0

    parts = build_policy_parts(cfg, tokenizer=_Tok(), load_weights=False)
    policy = parts.policy
    n_params = sum(p.numel() for p in policy.unwrapped_model().parameters())
    g = torch.Generator().manual_seed(0)
    n = args.pairs_per_step * (args.steps + args.warmup + args.profile)
    seq = lambda k: torch.randint(1, vocab, (k,), generator=g).tolist()
    prompts, chosen, rejected = [seq(P) for _ in range(n)], [seq(R) for _ in range(n)], [seq(R) for _ in range(n)]
    zeros = torch.zeros(n)
    loss = WDPO(beta1=0.1, beta2=1.0)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = []

    def part(step):
        sl = slice(step * args.pairs_per_step, (step + 1) * args.pairs_per_step)
        return PreferenceBatch(prompts[sl], chosen[sl], rejected[sl], zeros[sl] - 30, zeros[sl] - 30,
                               torch.ones(args.pairs_per_step), zeros[sl])

    for step in range(args.steps + args.warmup):
        sync()
        tic = time.perf_counter()
        policy.train(part(step), loss, epochs=1, seed=step)
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - tic)
    step_s = statistics.median(times)
    pairs = args.pairs_per_step
    model_flops = pairs * 2 * megatron_flops(m, tokens=P + R, attended=P + R, head_tokens=P + R, vocab=vocab)
    executed = pairs * megatron_flops(m, tokens=P + 2 * R, attended=P + R, head_tokens=2 * R, vocab=vocab)
    result = {"benchmark": "training", "preset": args.preset, "params": n_params, "precision": cfg.precision,
              "prompt_tokens": P, "response_tokens": R, "pairs_per_step": pairs,
              "micro_batch_size": args.micro_batch_size, "micro_batch_tokens": args.micro_batch_tokens,
              "step_s": [round(t, 4) for t in times],
              "median_step_s": round(step_s, 4), "pairs_per_s": round(pairs / step_s, 2),
              "tokens_per_s": round(pairs * (P + 2 * R) / step_s, 1),
              "model_tflops_per_s": round(model_flops / step_s / 1e12, 3),
              "mfu": round(model_flops / step_s / (args.peak_tflops * 1e12), 4),
              "executed_tflops_per_s": round(executed / step_s / 1e12, 3),
              "executed_mfu": round(executed / step_s / (args.peak_tflops * 1e12), 4),
              "attention_backend": m.attention_backend, "transformer_impl": m.transformer_impl,
              "peak_tflops": args.peak_tflops, **machine_info()}
    if args.profile:
        result["profile_top"] = profile_step(lambda: policy.train(part(args.steps + args.warmup), loss, epochs=1,
                                                                  seed=0), sync)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    if "--vs-trl" in sys.argv[1:]:
        # against TRL's DPOTrainer on a run's real pairs: bench/vs_trl.py (its own venv, see its docstring)
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import vs_trl

        vs_trl.main([a for a in sys.argv[1:] if a != "--vs-trl"])
    else:
        main(sys.argv[1:])
