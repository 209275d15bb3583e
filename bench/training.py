"""Policy training throughput and MFU: wDPO steps of the megatron policy on synthetic pairs.

    .venv/bin/python bench/training.py --preset llama-1b --precision bf16 --steps 10   # one GPU
    .venv/bin/python bench/training.py --preset tiny --steps 3                          # CPU smoke run

Prints one JSON object: tokens/s (prompt + response tokens of chosen and rejected sequences through
forward + backward), model FLOPs per token (6 N, plus attention 12 L h s), MFU against `--peak-tflops`
(default: the H100 SXM dense bf16 figure, 989; pass the right one for the machine), and the per-step
times. The first `--warmup` steps are not timed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

PRESETS = {
    # ~1.2 B parameters, Llama-3.2-1B-like shape (vocab 32000)
    "llama-1b": ["model.num_layers=16", "model.hidden_size=2048", "model.ffn_hidden_size=8192",
                 "model.num_attention_heads=32", "model.num_query_groups=8", "model.seq_length=1024",
                 "model.untie_embeddings_and_output_weights=false"],
    "tiny": ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=176",
             "model.num_attention_heads=4", "model.num_query_groups=2", "model.seq_length=128"],
}
VOCAB = {"llama-1b": 32000, "tiny": 300}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--pairs-per-step", type=int, default=16)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--response-tokens", type=int, default=256)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    args = ap.parse_args(argv)


    from optune_nemo.config import load_config
    from optune_nemo.interfaces import PreferenceBatch
    from optune_nemo.losses.wdpo import WDPO
    from optune_nemo.policy.megatron_policy import build_policy
    from optune_nemo.policy.parallel import init_distributed

    over = [*PRESETS[args.preset], "policy.hf_path=null", f"precision={args.precision}",
            f"parallel.use_distributed_optimizer={'true' if args.precision != 'fp32' else 'false'}",
            f"train.global_batch_size={args.pairs_per_step}", f"train.micro_batch_size={args.micro_batch_size}",
            "optim.warmup_ratio=0.0", "train.shuffle=false"]
    cfg = load_config(over)
    dist = init_distributed(1, 1)
    vocab = VOCAB[args.preset]
    policy = build_policy(cfg, vocab_size=vocab, pad_token_id=0, dist=dist)
    n_params = sum(p.numel() for p in policy.unwrapped_model().parameters())
    P, R = args.prompt_tokens, min(args.response_tokens, cfg.model.seq_length - args.prompt_tokens)
    g = torch.Generator().manual_seed(0)
    n = args.pairs_per_step * (args.steps + args.warmup)
    seq = lambda k: torch.randint(1, vocab, (k,), generator=g).tolist()
    prompts, chosen, rejected = [seq(P) for _ in range(n)], [seq(R) for _ in range(n)], [seq(R) for _ in range(n)]
    zeros = torch.zeros(n)
    batch = PreferenceBatch(prompts, chosen, rejected, zeros, zeros, torch.ones(n), zeros)
    loss = WDPO(beta1=0.1, beta2=1.0)
    times = []
    for step in range(args.steps + args.warmup):
        sl = slice(step * args.pairs_per_step, (step + 1) * args.pairs_per_step)
        part = PreferenceBatch(batch.prompts[sl], batch.chosen[sl], batch.rejected[sl], zeros[sl], zeros[sl],
                               batch.chosen_rewards[sl], batch.rejected_rewards[sl])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        tic = time.perf_counter()
        policy.train(part, loss, epochs=1, seed=step)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - tic)
    tokens_per_step = 2 * args.pairs_per_step * (P + R)
    m = cfg.model
    flops_per_token = 6 * n_params + 12 * m.num_layers * m.hidden_size * (P + R)
    tps = tokens_per_step * len(times) / sum(times)
    result = {"benchmark": "training", "preset": args.preset, "params": n_params, "precision": args.precision,
              "tokens_per_step": tokens_per_step, "step_s": [round(t, 3) for t in times],
              "tokens_per_s": round(tps, 1), "model_tflops_per_s": round(tps * flops_per_token / 1e12, 3),
              "mfu": round(tps * flops_per_token / (args.peak_tflops * 1e12), 4), "peak_tflops": args.peak_tflops,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
