"""Per-prompt held-out records (exp_dir/eval/*.parquet) every evaluation: one row per held-out prompt with
its answer, gold reward, exact-answer flag, length and judge outcome, checked against independent
computations from the stored answer texts and the task's own problems."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_optune_loop import E2E

from optune_nemo.data.tasks.arithmetic import arithmetic_problems
from optune_nemo.reward.rules import arithmetic_reward

ROOT = Path(__file__).resolve().parents[2]
N = 6


def _last_number_is(text: str, answer) -> bool:
    """The task's exactness rule, restated: the last number of the answer equals the answer."""
    numbers = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
    return bool(numbers) and float(numbers[-1]) == float(answer)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    exp = tmp_path_factory.mktemp("eval") / "run"
    overrides = [o for o in E2E if not o.startswith(("eval.num_prompts", "reward.function", "++reward"))]
    proc = subprocess.run([sys.executable, "-m", "optune_nemo.train", *overrides, "optune.iterations=2",
                           f"eval.num_prompts={N}", "eval.max_new_tokens=8", f"exp_dir={exp}"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return exp


def test_one_file_per_evaluation_with_every_prompt(run):
    names = sorted(p.name for p in (run / "eval").glob("*.parquet"))
    assert names == ["baseline.parquet", "iter_000000.parquet", "iter_000001.parquet"]
    for name in names:
        table = pq.read_table(run / "eval" / name).to_pydict()
        assert len(table["prompt_id"]) == N and len(set(table["prompt_id"])) == N
        assert {"answer", "gold_reward", "tokens", "success"} <= set(table)


def test_records_agree_with_independent_computations(run):
    problems = arithmetic_problems(N, seed=0, split="heldout")
    evals = json.loads((run / "eval.json").read_text())
    base = pq.read_table(run / "eval" / "baseline.parquet").to_pydict()
    for t in (0, 1):
        rec = pq.read_table(run / "eval" / f"iter_{t:06d}.parquet").to_pydict()
        order = rec["prompt_id"]
        assert order == base["prompt_id"]
        meta = [{"answer": problems[i]["answer"]} for i in range(N)]
        assert rec["gold_reward"] == pytest.approx(arithmetic_reward([""] * N, rec["answer"], meta))
        assert rec["success"] == [_last_number_is(a, m["answer"]) for a, m in zip(rec["answer"], meta)]
        summary = evals["iterations"][str(t)]
        assert sum(rec["gold_reward"]) / N == pytest.approx(summary["reward_mean"])
        assert sum(rec["success"]) / N == pytest.approx(summary["accuracy"])
        # the default judge (eval.judge=reward, tie margin 0): the higher gold reward wins
        expected = ["win" if c > b else "lose" if c < b else "tie" for c, b in zip(rec["gold_reward"],
                                                                                 base["gold_reward"])]
        assert rec["judge_outcome"] == expected
        assert summary["wins"] == expected.count("win") and summary["ties"] == expected.count("tie")
