"""A quick look at a model with the system's own generation engine:

    python -m optune_nemo.generate --hf smollm2 --prompt "What is 17 + 25?" [--prompt ...]
    python -m optune_nemo.generate --hf DIR_OR_GGUF --prompt ... --temperature 0.7 --top-p 0.9
    python -m optune_nemo.generate --ckpt runs/x/checkpoints/iter_000002 --prompt ...

Prompts are rendered with the model's chat template; greedy unless --temperature > 0. Prints one
JSON object per prompt and sample: prompt, response, token ids, finish reason.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from optune_nemo.config import load_config
from optune_nemo.errors import EXIT_CHECKPOINT, EXIT_USER, CheckpointError, ConfigError

# A quick look, not a run: greedy by default (reproducible answers to compare models), an answer long
# enough to read, and room for a chat prompt. A run's sampling comes from the generation.* config.
DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_SEQ_LENGTH = 1024


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m optune_nemo.generate", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", help="Hugging Face directory, .gguf file, or smollm2")
    src.add_argument("--ckpt", help="a checkpoint directory exp_dir/checkpoints/iter_NNNNNN")
    p.add_argument("--prompt", action="append", required=True, help="a user message (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass; 1 = off")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("-n", type=int, default=1, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seq-length", type=int, default=DEFAULT_SEQ_LENGTH, help="longest prompt + response")
    p.add_argument("--cache-dir", default=None, help="where a .gguf is dequantised (default: policy.cache_dir)")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "auto"],
                   help="default: the checkpoint's, else the schema's (auto)")
    return p.parse_args(argv)


def _config(args):
    from optune_nemo.runner import resolve

    if args.ckpt:
        from optune_nemo.algorithm.optune import read_trainer_state
        from optune_nemo.runtime.checkpoint import checkpoint_problem

        problem = checkpoint_problem(Path(args.ckpt))      # screened before anything is loaded from it
        if problem is not None:
            raise CheckpointError(f"--ckpt: {problem}")
        cfg = read_trainer_state(Path(args.ckpt))[1]
    else:
        cfg = load_config([f"policy.hf_path={args.hf}", f"model.seq_length={args.seq_length}"])
    if args.cache_dir:
        cfg.policy.cache_dir = args.cache_dir
    if args.precision:
        cfg.precision = args.precision
    cfg.parallel.tensor_model_parallel_size = cfg.parallel.pipeline_model_parallel_size = 1
    return resolve(cfg)


def run(args) -> list[dict]:
    from optune_nemo.generation.torch_engine import TorchEngine
    from optune_nemo.interfaces import SamplingParams
    from optune_nemo.train import build_policy_parts

    cfg = _config(args)
    parts = build_policy_parts(cfg, load_weights=not args.ckpt)
    if args.ckpt:
        parts.policy.load_checkpoint(str(Path(args.ckpt) / "model"), load_optimizer=False)
    tokenizer = parts.tokenizer
    engine = TorchEngine(parts.policy.inference_model(), decode=tokenizer.decode, dist=parts.dist,
                         batch_size=len(args.prompt))
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in args.prompt]
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_new_tokens=args.max_new_tokens, stop_token_ids=tokenizer.stop_token_ids,
                            seed=args.seed)
    out = engine.generate(prompts, params, keys=list(range(len(prompts))))
    return [{"prompt": text, "sample": j, "response": s.text, "token_ids": s.token_ids,
             "finish_reason": s.finish_reason} for text, samples in zip(args.prompt, out)
            for j, s in enumerate(samples)]


def main(argv=None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING)
    try:
        for row in run(_parse(argv)):
            print(json.dumps(row), flush=True)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"optune_nemo.generate: {e}", file=sys.stderr)
        return EXIT_USER
    except CheckpointError as e:
        print(f"optune_nemo.generate: {e}", file=sys.stderr)
        return EXIT_CHECKPOINT
    return 0


if __name__ == "__main__":
    sys.exit(main())
