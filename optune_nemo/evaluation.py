"""Held-out evaluation of the built-in arithmetic task: greedy answers, exact-match accuracy and
mean reward, before the first and after the last iteration (exp_dir/eval.json, a plot)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from optune_nemo.fileio import write_json_atomic
from optune_nemo.interfaces import SamplingParams
from optune_nemo.reward.rules import is_exact

log = logging.getLogger(__name__)

EVAL_FILE = "eval.json"


def evaluate(engine, reward, prompts, *, max_new_tokens: int, stop_token_ids) -> dict:
    """Greedy answers to `prompts` (each with metadata["answer"]): accuracy and mean reward."""
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens,
                            stop_token_ids=tuple(stop_token_ids), seed=0)
    engine.begin_generation()
    try:
        samples = [s[0] for s in engine.generate([list(p.token_ids) for p in prompts], params,
                                                 keys=[p.prompt_id for p in prompts])]
    finally:
        engine.end_generation()
    reward.prepare()
    try:
        rewards = reward.score(list(prompts), [s.text for s in samples])
    finally:
        reward.release()
    exact = [is_exact(s.text, p.metadata["answer"]) for s, p in zip(samples, prompts)]
    return {"num_prompts": len(prompts), "accuracy": sum(exact) / len(prompts),
            "reward_mean": sum(rewards) / len(rewards),
            "examples": [{"prompt": p.text, "answer": p.metadata["answer"], "response": s.text}
                         for p, s in list(zip(prompts, samples))[:5]]}


def read_eval(exp_dir: Path) -> dict:
    path = exp_dir / EVAL_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_eval(exp_dir: Path, key: str, result: dict) -> None:
    write_json_atomic(exp_dir / EVAL_FILE, {**read_eval(exp_dir), key: result})


def plot_rewards(exp_dir: Path, records: list[dict], evals: dict) -> Path:
    """reward_per_iteration.png: chosen / rejected reward of the store per iteration, and the
    held-out mean reward before and after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    its = [r["iteration"] for r in records]
    ax.plot(its, [r["reward_chosen_mean"] for r in records], "o-", label="store: chosen reward")
    ax.plot(its, [r["reward_rejected_mean"] for r in records], "s-", label="store: rejected reward")
    if "before" in evals and "after" in evals:
        ax.plot([its[0] - 0.5, its[-1] + 0.5], [evals["before"]["reward_mean"], evals["after"]["reward_mean"]],
                "k--", label="held-out greedy reward (before -> after)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = exp_dir / "reward_per_iteration.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
