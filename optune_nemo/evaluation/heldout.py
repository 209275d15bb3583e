"""Held-out evaluation after every `eval.every` iterations, and of the starting policy once.

Each evaluation answers the held-out prompts greedily and reports
  - `reward_mean`: the mean reward of the answers under the task's gold reward for built-in tasks (the
    arithmetic task's rule; a run trained on a learned proxy RM is judged by the gold rule), else under
    the run's own reward;
  - `accuracy`: the exact-answer rate, where the task defines it;
  - `response_tokens_mean`: the mean answer length;
  - the paper's win score (eq. 7) of these answers against the baseline answers (by default the starting
    policy's, generated once and kept), judged by `eval.judge` (optune_nemo/evaluation/judge.py).
Results go into the iteration's metrics record (`eval_*` keys, hence TensorBoard), every prompt's
answer, gold reward, success flag, length and judge outcome into `exp_dir/eval/iter_NNNNNN.parquet` (so two
runs that share held-out prompts can be compared prompt by prompt), and the means into
`exp_dir/eval.json` ({"baseline": {...}, "iterations": {"t": {...}}}). The evaluator is a checkpoint part:
the baseline answers and every result so far are saved with each checkpoint, so a resumed or forked run
(`init_from`) compares against the same baseline.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from optune_nemo.interfaces import Prompt, SamplingParams
from optune_nemo.runtime.distributed import broadcast_object, global_rank
from optune_nemo.runtime.fileio import write_json_atomic

log = logging.getLogger(__name__)

EVAL_FILE = "eval.json"
PROMPT_RECORDS_DIR = "eval"
"""exp_dir/eval/iter_NNNNNN.parquet: every held-out prompt's record of the evaluation after iteration N:
prompt_id, answer, gold_reward, tokens, success (built-in tasks: the task's exact-answer check, the
primary endpoint), judge_outcome (win / lose / tie against the baseline answer). Rewritten identically when
a resumed run evaluates iteration N again; a fork's inherited iterations are in its source run's eval/.
The starting policy's records are eval/baseline.parquet (without judge_outcome)."""
EXAMPLES = 5
"""Answers kept in eval.json per evaluation (all answers are kept for the baseline)."""


def gold_reward(cfg, dist):
    """The reward evaluations are scored with: the built-in task's own rule (its gold reward) when the prompts
    come from it, else the run's reward."""
    from optune_nemo.reward import build_reward

    if cfg.data.path is None and cfg.eval.path is None:
        from optune_nemo.config import RewardConfig
        from optune_nemo.data.tasks import get_task

        return build_reward(RewardConfig(function={"_target_": get_task(cfg.data.task).gold_reward}), dist=dist)
    return build_reward(cfg.reward, dist=dist)


def answer(engine, prompts: list[Prompt], *, max_new_tokens: int, stop_token_ids) -> list:
    """Greedy answers (one Sample per prompt)."""
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=tuple(stop_token_ids))
    engine.begin_generation()
    try:
        return [s[0] for s in engine.generate([list(p.token_ids) for p in prompts], params,
                                              keys=[p.prompt_id for p in prompts])]
    finally:
        engine.end_generation()


def score(reward, prompts: list[Prompt], texts: list[str]) -> list[float]:
    reward.prepare()
    try:
        return reward.score(prompts, texts)
    finally:
        reward.release()


class Evaluator:
    """Called after iteration t (`OPTune.after_iteration`); a checkpoint part."""

    def __init__(self, cfg, *, engine, reward, judge, prompts: list[Prompt], stop_token_ids, task=None):
        self.cfg, self.engine, self.reward, self.judge = cfg, engine, reward, judge
        self.prompts, self.stop_token_ids, self.task = prompts, tuple(stop_token_ids), task
        self.path = Path(cfg.exp_dir) / EVAL_FILE
        self.state: dict = {"baseline": None, "iterations": {}}
        self.last_rows: dict[str, list] = {}

    # ------------------------------------------------------------------ one evaluation

    def _evaluate(self) -> tuple[dict, list[str], list[float]]:
        samples = answer(self.engine, self.prompts, max_new_tokens=self.cfg.eval.max_new_tokens,
                         stop_token_ids=self.stop_token_ids)
        texts = [s.text for s in samples]
        rewards = score(self.reward, self.prompts, texts)
        n = len(self.prompts)
        self.last_rows = {"prompt_id": [p.prompt_id for p in self.prompts], "answer": texts,
                          "gold_reward": [float(r) for r in rewards],
                          "tokens": [int(s.num_tokens) for s in samples]}
        result = {"num_prompts": n, "reward_mean": sum(rewards) / n,
                  "response_tokens_mean": sum(s.num_tokens for s in samples) / n}
        if self.task is not None:
            success = [bool(self.task.is_correct(t, p.metadata)) for t, p in zip(texts, self.prompts)]
            self.last_rows["success"] = success
            result["accuracy"] = sum(success) / n
        return result, texts, rewards

    def ensure_baseline(self) -> dict:
        """The baseline's answers and scores: the starting policy's (generated now, once per run family), or
        the answers of eval.baseline's file (scored now)."""
        if self.state["baseline"] is None:
            if self.cfg.eval.baseline == "start":
                result, texts, rewards = self._evaluate()
            else:
                texts = _read_answers(self.cfg.eval.baseline, self.prompts)
                rewards = score(self.reward, self.prompts, texts)
                result = {"num_prompts": len(texts), "reward_mean": sum(rewards) / len(texts)}
            self.state["baseline"] = {**result, "source": self.cfg.eval.baseline, "answers": texts,
                                      "rewards": rewards}
            self._write()
            if self.cfg.eval.baseline == "start" and global_rank() == 0:
                self._write_prompt_records(None)
            log.info("held-out baseline (%s): mean reward %.4f%s", self.cfg.eval.baseline, result["reward_mean"],
                     f", accuracy {result['accuracy']:.3f}" if "accuracy" in result else "")
        return self.state["baseline"]

    def due(self, t: int) -> bool:
        last = self.cfg.optune.iterations - 1
        return t == last or (t + 1) % self.cfg.eval.every == 0

    def __call__(self, t: int) -> dict:
        """Evaluate after iteration t when due: the `eval_*` keys for the metrics record."""
        if not self.due(t):
            return {}
        base = self.ensure_baseline()
        result, texts, rewards = self._evaluate()
        verdict = None
        if global_rank() == 0:   # one judge (an LLM judge sends its requests once), shared with every rank
            judged = self.judge.compare([p.text for p in self.prompts], texts, base["answers"],
                                        candidate_rewards=rewards, baseline_rewards=base["rewards"],
                                        conversations=[p.conversation() for p in self.prompts])
            verdict = judged.summary()
            self.last_rows["judge_outcome"] = list(judged.outcomes)
            self._write_prompt_records(t)
        verdict = broadcast_object(verdict)
        result.update({k: verdict[k] for k in ("win_score", "wins", "losses", "ties", "invalid")})
        self.state["iterations"][str(t)] = {**result, "examples": [
            {"prompt": p.text, "response": x} for p, x in list(zip(self.prompts, texts))[:EXAMPLES]]}
        self._write()
        log.info("held-out after iteration %d: mean reward %.4f (baseline %.4f)%s, win score %.1f (%d wins, "
                 "%d losses, %d ties)", t, result["reward_mean"], base["reward_mean"],
                 f", accuracy {result['accuracy']:.3f}" if "accuracy" in result else "", result["win_score"],
                 result["wins"], result["losses"], result["ties"])
        return {f"eval_{k}": v for k, v in result.items() if k != "num_prompts"}

    # ------------------------------------------------------------------ files and checkpoint part

    def _write_prompt_records(self, t: int | None) -> None:
        """Rank 0: exp_dir/eval/iter_NNNNNN.parquet (baseline.parquet for the starting policy), one row per
        held-out prompt (PROMPT_RECORDS_DIR)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from optune_nemo.runtime.fileio import atomic_file

        name = "baseline" if t is None else f"iter_{t:06d}"
        path = Path(self.cfg.exp_dir) / PROMPT_RECORDS_DIR / f"{name}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            pq.write_table(pa.table(self.last_rows), tmp)

    def _write(self) -> None:
        if global_rank() == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, self.state)

    def save(self, directory: Path) -> None:
        if global_rank() == 0:
            write_json_atomic(Path(directory) / EVAL_FILE, self.state)

    def load(self, directory: Path) -> None:
        """The checkpoint's baseline and results (those of later iterations, from a run that did not reach
        its checkpoint, are dropped); exp_dir/eval.json is rewritten to match."""
        path = Path(directory) / EVAL_FILE
        if path.is_file():
            self.state = json.loads(path.read_text())
            self._write()


def _read_answers(path: str, prompts: list[Prompt]) -> list[str]:
    from optune_nemo.config import ConfigError

    by_id = {}
    for n, line in enumerate(Path(path).expanduser().read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
                by_id[int(row["prompt_id"])] = str(row["response"])
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"eval.baseline: {path} line {n} must be {{\"prompt_id\": int, "
                                  f"\"response\": str}}") from None
    missing = [p.prompt_id for p in prompts if p.prompt_id not in by_id]
    if missing:
        raise ConfigError(f"eval.baseline: {path} has no answer for held-out prompt ids {missing[:5]}")
    return [by_id[p.prompt_id] for p in prompts]


def read_eval(exp_dir: Path) -> dict:
    path = Path(exp_dir) / EVAL_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def iteration_ticks(first: int, last: int, *, start: bool) -> tuple[list[int], list[str]]:
    """Integer x ticks from iteration `first` to `last` (every 1, 2, 5, 10, 20, ... iterations, at most 11),
    and with `start` the starting policy's position first - 1 labelled `start`."""
    span = max(last - first, 0)
    step = next(s for m in (1, 10, 100, 1000, 10**9) for s in (m, 2 * m, 5 * m) if span / s <= 10)
    ticks = [t for t in range(first, last + 1) if t % step == 0] or [first]
    labels = [str(t) for t in ticks]
    if start:
        ticks, labels = [first - 1, *ticks], ["start", *labels]
    return ticks, labels


def reward_figure(records: list[dict], evals: dict):
    """The figure of `plot_rewards`: the store's chosen / rejected reward per iteration, and the held-out gold
    reward of the starting policy (at the tick `start`, left of the first iteration) and after every evaluated
    iteration; integer iteration ticks, the legend below the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
    its = [r["iteration"] for r in records]
    ax.plot(its, [r["reward_chosen_mean"] for r in records], "o-", label="store: chosen reward")
    ax.plot(its, [r["reward_rejected_mean"] for r in records], "s-", label="store: rejected reward")
    evaluated = sorted((int(t), v["reward_mean"]) for t, v in evals.get("iterations", {}).items())
    xs = its + [t for t, _ in evaluated]
    first, last = (min(xs), max(xs)) if xs else (0, 0)
    start = bool(evals.get("baseline"))
    if start:
        ax.plot([first - 1] + [t for t, _ in evaluated], [evals["baseline"]["reward_mean"]] + [v for _, v in evaluated],
                "k^--", label="held-out greedy gold reward (starting policy, then after each iteration)")
    ticks, labels = iteration_ticks(first, last, start=start)
    ax.set_xticks(ticks, labels)
    ax.set_xlim(ticks[0] - 0.5, max(last, ticks[-1]) + 0.5)
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncol=2 if not start else 1, fontsize=8, frameon=False)
    return fig


def plot_rewards(exp_dir: Path, records: list[dict], evals: dict) -> Path:
    """reward_per_iteration.png (`reward_figure`)."""
    import matplotlib.pyplot as plt

    fig = reward_figure(records, evals)
    path = Path(exp_dir) / "reward_per_iteration.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
