"""The learned-reward recipe end to end, the gold-versus-proxy set-up of RLHF research: the built-in task's
rule reward is the "gold"; a reward model trained on gold-labelled pairs is the "proxy" OPTune optimises;
the gold reward judges the result.

    .venv/bin/python experiments/gold_proxy.py --root runs/gold_proxy [--prompts 256] [--rm-epochs 2] \
        [--train-overrides K=V ...] [--rm-overrides K=V ...] [-- overrides for every run]

Overrides after `--` go to every run (keys both entry points have: policy.*, model.*, precision, ...);
`--train-overrides` to the two `optune_nemo.train` runs only (sample, OPTune: generation.*, data.*, eval.*,
optune.*, ...), `--rm-overrides` to `optune_nemo.rm.train` only (rm.*, ...). A smoke run on the tiny random
model (tests/e2e/test_user_scripts.py):

    .venv/bin/python experiments/gold_proxy.py --root /tmp/gp --prompts 16 --rm-epochs 1 \
        --train-overrides data.num_prompts=4 eval.num_prompts=2 generation.max_new_tokens=4 optune.iterations=2 ... \
        --rm-overrides rm.global_batch_size=4 rm.micro_batch_size=2 -- policy.hf_path=null precision=fp32

  (a) sample: one fully online iteration without training on --prompts training prompts of the built-in
      task (`optune.iterations=1 train.epochs_per_iteration=0`): two responses per prompt from the starting
      SmolLM2, scored by the gold rule reward; ties dropped, the higher-reward response chosen ->
      ROOT/prefs.jsonl;
  (b) `python -m optune_nemo.train_rm` on those pairs (SmolLM2 backbone, a held-out fraction) -> ROOT/rm,
      its held-out pairwise accuracy;
  (c) `python -m optune_nemo.train reward.type=megatron reward.path=ROOT/rm` (the default recipe otherwise):
      OPTune on the proxy, co-located with the policy;
  (d) ROOT/gold_proxy.json: held-out gold reward and accuracy before/after (the run's per-iteration
      evaluation always scores with the task's gold reward), the proxy reward of the rollout store per
      iteration, and the proxy-gold gap on the policy's own final samples: how often the proxy's preferred
      response of a pair is also the gold reward's (against the RM's held-out accuracy on the starting
      policy's samples), and the change of proxy and gold reward over the run.
Each stage is skipped when its output is complete, so rerunning resumes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from optune_nemo.algorithm.store import RolloutStore
from optune_nemo.reward.rules import arithmetic_reward
from optune_nemo.runtime.hardware import machine_info


def _run(args: list[str]) -> None:
    print("+ " + " ".join(args), flush=True)
    proc = subprocess.run([sys.executable, "-m", *args])
    if proc.returncode != 0:
        raise SystemExit(f"gold_proxy: `{' '.join(args[:2])}` failed with exit code {proc.returncode}")


def _rollouts(run: Path, t: int) -> Path:
    return run / "checkpoints" / f"iter_{t:06d}" / "rollouts.parquet"


def _store(run: Path, t: int) -> dict:
    return pq.read_table(_rollouts(run, t)).to_pydict()


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_preferences(rollouts: Path, path: Path) -> dict:
    """Gold-labelled pairs of a rollout store as preference rows, oriented and tie-filtered exactly as
    the loss sees them (RolloutStore.preference_pairs); returns counts."""
    store = RolloutStore.from_parquet(rollouts)
    pairs, ties = store.preference_pairs()
    rows = []
    for p in pairs:
        rec = store.pair(p.prompt_id)
        a_won = tuple(rec.response_a.token_ids) == tuple(p.chosen_token_ids)
        chosen, rejected = (rec.response_a, rec.response_b) if a_won else (rec.response_b, rec.response_a)
        rows.append({"id": p.prompt_id, "prompt": rec.prompt.text, "chosen": chosen.text,
                     "rejected": rejected.text})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"pairs": len(rows), "ties_dropped": ties}


def gold_agreement(store: dict) -> dict:
    """On a store scored by the proxy: the gold reward of both responses, and how often the proxy's
    preferred response is also gold's (pairs gold ranks equal are left out)."""
    meta = [json.loads(m) if isinstance(m, str) else m for m in store["metadata"]]
    gold_a = arithmetic_reward(store["prompt"], store["response_a"], meta)
    gold_b = arithmetic_reward(store["prompt"], store["response_b"], meta)
    agree = total = 0
    for pa, pb, ga, gb in zip(store["reward_a"], store["reward_b"], gold_a, gold_b):
        if ga == gb or pa == pb:
            continue
        total += 1
        agree += (pa > pb) == (ga > gb)
    best_gold = [max(a, b) for a, b in zip(gold_a, gold_b)]
    return {"pairs_ranked": total, "agreement": agree / total if total else None,
            "gold_best_mean": sum(best_gold) / len(best_gold)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True, type=Path)
    ap.add_argument("--prompts", type=int, default=256, help="training prompts sampled for the RM's pairs")
    ap.add_argument("--rm-epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--train-overrides", nargs="+", default=[], metavar="K=V",
                    help="Hydra overrides for the optune_nemo.train runs only (sample, OPTune)")
    ap.add_argument("--rm-overrides", nargs="+", default=[], metavar="K=V",
                    help="Hydra overrides for the optune_nemo.rm.train run only")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    common = [f"seed={args.seed}", "logging.progress=false", *args.overrides]
    train = [*common, *args.train_overrides]

    sample = root / "sample"
    if not (sample / "COMPLETED").is_file():
        # the stage's own keys last: they define it (of a key given twice, Hydra keeps the last value)
        _run(["optune_nemo.train", *train, f"exp_dir={sample}", "optune.iterations=1", "train.epochs_per_iteration=0",
              f"data.num_prompts={args.prompts}", "eval.num_prompts=0", "policy.export_hf_final=false"])
    prefs = root / "prefs.jsonl"
    counts = write_preferences(_rollouts(sample, 0), prefs)

    rm = root / "rm"
    if not (rm / "COMPLETED").is_file():
        _run(["optune_nemo.rm.train", f"exp_dir={rm}", f"data.path={prefs}", f"rm.epochs={args.rm_epochs}",
              "rm.eval_fraction=0.15", "rm.eval_every=10", *common, *args.rm_overrides])
    rm_records = [r for r in _records(rm / "metrics.jsonl") if "eval_accuracy" in r]

    run = root / "optune"
    if not (run / "COMPLETED").is_file():
        _run(["optune_nemo.train", f"exp_dir={run}", "reward.type=megatron", f"reward.path={rm}", *train])
    records = _records(run / "metrics.jsonl")
    evals = json.loads((run / "eval.json").read_text())
    last = max(int(t) for t in evals["iterations"])
    first_store, last_store = _store(run, 0), _store(run, last)

    result = {
        "date": datetime.date.today().isoformat(), "prompts_sampled": args.prompts, **counts,
        "rm_epochs": args.rm_epochs,
        "rm_heldout_accuracy_first": rm_records[0]["eval_accuracy"] if rm_records else None,
        "rm_heldout_accuracy_last": rm_records[-1]["eval_accuracy"] if rm_records else None,
        "rm_heldout_pairs": rm_records[-1].get("eval_pairs") if rm_records else None,
        "gold_heldout_before": evals["baseline"]["reward_mean"],
        "gold_heldout_after": evals["iterations"][str(last)]["reward_mean"],
        "accuracy_heldout_before": evals["baseline"].get("accuracy"),
        "accuracy_heldout_after": evals["iterations"][str(last)].get("accuracy"),
        "win_score_after": evals["iterations"][str(last)].get("win_score"),
        "proxy_store_chosen_per_iteration": [r["reward_chosen_mean"] for r in records],
        "gold_heldout_per_iteration": [r.get("eval_reward_mean") for r in records],
        "agreement_first_store": gold_agreement(first_store),
        "agreement_last_store": gold_agreement(last_store),
        "iterations": len(records), **machine_info()}
    (root / "gold_proxy.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
