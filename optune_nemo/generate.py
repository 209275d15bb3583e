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

from optune_nemo.config import ConfigError, load_config


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m optune_nemo.generate", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", help="Hugging Face directory, .gguf file, or smollm2")
    src.add_argument("--ckpt", help="a checkpoint directory exp_dir/checkpoints/iter_NNNNNN")
    p.add_argument("--prompt", action="append", required=True, help="a user message (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("-n", type=int, default=1, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seq-length", type=int, default=1024, help="longest prompt + response")
    p.add_argument("--work-dir", default=None, help="where a .gguf is dequantised (default: beside a "
                   "checkpoint, else ./.optune_cache)")
    return p.parse_args(argv)


def _config(args):
    import torch

    if args.ckpt:
        ckpt = Path(args.ckpt)
        if not (ckpt / "trainer_state.pt").is_file():
            raise ConfigError(f"--ckpt: {ckpt} is not a checkpoint directory (no trainer_state.pt)")
        cfg = torch.load(ckpt / "trainer_state.pt", weights_only=False)["config"]
        return cfg, ckpt.parent.parent
    cfg = load_config([f"policy.hf_path={args.hf}", f"model.seq_length={args.seq_length}"])
    return cfg, Path(args.work_dir or ".optune_cache")


def run(args) -> list[dict]:
    from optune_nemo.data import ByteTokenizer
    from optune_nemo.distributed import init_distributed
    from optune_nemo.generation.torch_engine import TorchEngine
    from optune_nemo.policy.megatron_policy import build_policy
    from optune_nemo.types import SamplingParams

    cfg, work_dir = _config(args)
    dist = init_distributed(1, 1)
    hf_dir = None
    if cfg.policy.hf_path is not None:
        from optune_nemo.data.hf_tokenizer import HFTokenizer
        from optune_nemo.policy.pretrained import pretrained_model_config, resolve_hf_dir

        hf_dir = resolve_hf_dir(cfg.policy.hf_path, work_dir, rank=0)
        cfg.model = pretrained_model_config(cfg, hf_dir)
        tokenizer = HFTokenizer.from_pretrained(hf_dir, chat_template=cfg.policy.chat_template,
                                                stop_tokens=cfg.policy.stop_tokens)
    else:
        tokenizer = ByteTokenizer()
    cfg.parallel.tensor_model_parallel_size = cfg.parallel.pipeline_model_parallel_size = 1
    policy = build_policy(cfg, vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id, dist=dist)
    if args.ckpt:
        policy.load_checkpoint(str(Path(args.ckpt) / "model"), load_optimizer=False)
    else:
        from optune_nemo.policy.pretrained import load_pretrained_weights

        load_pretrained_weights(policy, hf_dir)
    engine = TorchEngine(policy.unwrapped_model(), decode=tokenizer.decode, dist=dist,
                         vocab_size=tokenizer.vocab_size, batch_size=8, max_sequence_length=cfg.model.seq_length)
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
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
