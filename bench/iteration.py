"""One OPTune iteration, phase by phase, at rho = 1 and at rho < 1 from the same iteration-0 checkpoint:
the measured speed-up against Amdahl's bound.

    .venv/bin/python bench/iteration.py --out runs/bench_iteration --iterations 3 --rho 0.5 -- [overrides]

A base run does iteration 0 (fully online; `optune.iterations=1`); two runs fork from its checkpoint
(`init_from`): online DPO (rho = 1, selection=all) and OPTune (`--rho`, lowest_reward), each for
`--iterations` more iterations of the default recipe plus the given overrides (the held-out evaluation is
off: it is not part of an iteration). From their metrics (iterations t >= 1) it reports, per setting, the
median seconds of every phase (generation, reward, reference, train) and of the rest of the iteration
(selection, store update, bookkeeping), their shares, the measured speed-up (median iteration time at
rho = 1 over that at rho), and Amdahl's bound 1 / (1 - g + g * rho) with g the generation share measured at
rho = 1 (generation is what selection cuts; the reward scoring shrinks with rho too and is reported),
and the work after generation: pairs trained and prompt + response tokens per non-tied stored pair
(the bound assumes that work is the same at both rho; kept pairs carry older responses).
`--num-samples N` (N > 2) forks two more runs from the same iteration 0, rho = 1 and `--rho` with
generation.num_samples=N, and reports their phases, generated tokens and reward calls beside the n = 2 ones
with the ratios n = N / n = 2 (what more samples per regenerated prompt cost; their quality is the
report's: experiments/decisive.sh runs n = 4 with held-out evaluation).
Prints one JSON object and writes it to OUT/iteration.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from optune_nemo.runtime.hardware import machine_info

PHASES = ("generation", "reward", "reference", "train")


def _train(exp_dir: Path, overrides: list[str]) -> None:
    if (exp_dir / "COMPLETED").exists():
        return
    proc = subprocess.run([sys.executable, "-m", "optune_nemo.train", f"exp_dir={exp_dir}", *overrides])
    if proc.returncode != 0:
        raise SystemExit(f"bench/iteration.py: the run in {exp_dir} failed (exit {proc.returncode})")


def _summary(exp_dir: Path) -> dict:
    records = [json.loads(line) for line in (exp_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if r["iteration"] >= 1]
    med = lambda key: statistics.median(r[key] for r in records)
    out = {f"{p}_s": med(f"time_{p}_s") for p in PHASES}
    out["total_s"] = med("time_total_s")
    out["other_s"] = statistics.median(r["time_total_s"] - sum(r[f"time_{p}_s"] for p in PHASES) for r in records)
    out.update({f"{p}_share": out[f"{p}_s"] / out["total_s"] for p in (*PHASES, "other")})
    out.update(iterations=len(records), regenerated=med("regenerated"), generated_tokens=med("generated_tokens"),
               train_pairs=med("train_pairs"), reward_calls=med("reward_calls"), num_samples=records[0]["num_samples"])
    sizes = [_pair_tokens(exp_dir / "checkpoints" / f"iter_{r['iteration']:06d}" / "rollouts.parquet")
             for r in records]
    sizes = [x for x in sizes if x is not None]
    # what the phases after generation work on: the store's pairs (kept ones carry older responses)
    out["tokens_per_pair"] = statistics.median(sizes) if sizes else None
    return out


def _pair_tokens(path: Path) -> float | None:
    """Mean prompt + both responses tokens per pair of a stored rollout store (None when pruned)."""
    if not path.is_file():
        return None
    from optune_nemo.algorithm.store import RolloutStore

    pairs, _ = RolloutStore.from_parquet(path).preference_pairs()
    sizes = [len(p.prompt_token_ids) + len(p.chosen_token_ids) + len(p.rejected_token_ids) for p in pairs]
    return statistics.mean(sizes) if sizes else None


def parser() -> argparse.ArgumentParser:
    """The command line (the smoke test parses bench/gpu_session.sh's commands with it)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--iterations", type=int, default=3, help="OPTune iterations after iteration 0")
    ap.add_argument("--rho", type=float, default=0.5)
    ap.add_argument("--num-samples", type=int, default=2,
                    help="also fork rho = 1 and --rho with generation.num_samples=N from the same iteration 0 (N > 2)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    return ap


def main(argv=None) -> dict:
    ap = parser()
    args = ap.parse_args(argv)
    if args.num_samples < 2:
        ap.error(f"--num-samples: must be >= 2, a pair needs two samples (got {args.num_samples})")
    out = Path(args.out)
    common = [*args.overrides, "eval.num_prompts=0", "policy.export_hf_final=false"]
    base = out / "base"
    _train(base, [*common, "optune.iterations=1"])
    init = f"init_from={(base / 'checkpoints' / 'iter_000000').resolve()}"
    total = f"optune.iterations={1 + args.iterations}"
    full, part = out / "rho_1.0", out / f"rho_{args.rho}"
    _train(full, [*common, init, total, "optune.rho=1.0", "optune.selection=all"])
    _train(part, [*common, init, total, f"optune.rho={args.rho}", "optune.selection=lowest_reward"])
    a, b = _summary(full), _summary(part)
    g = a["generation_share"]
    bound = 1.0 / (1.0 - g + g * args.rho)
    speedup = a["total_s"] / b["total_s"]
    result = {"benchmark": "iteration", "rho": args.rho, "iterations": args.iterations,
              "overrides": args.overrides, "rho_1": a,
              f"rho_{args.rho}": b, "generation_share_rho_1": round(g, 4),
              "reward_share_rho_1": round(a["reward_share"], 4), "amdahl_bound": round(bound, 4),
              "speedup": round(speedup, 4), "speedup_over_bound": round(speedup / bound, 4)}
    n = args.num_samples
    if n != 2:
        more = {}
        for rho, ref in ((1.0, a), (args.rho, b)):
            d = out / f"rho_{rho}-n{n}"
            _train(d, [*common, init, total, f"optune.rho={rho}", f"generation.num_samples={n}",
                       "optune.selection=" + ("all" if rho == 1.0 else "lowest_reward")])
            m = _summary(d)
            more[f"rho_{rho}"] = {**m, "over_n2": {k: round(m[k] / ref[k], 4) if ref[k] else None
                                                   for k in ("generated_tokens", "reward_calls", "generation_s",
                                                             "total_s")}}
        result[f"n{n}"] = more
    result.update(machine_info())
    (out / "iteration.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
