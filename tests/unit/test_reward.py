"""Reward protocol (ShardedReward via RuleReward, build_reward) and the rule-based arithmetic reward."""

import math
import sys

import pytest

from optune_nemo.config import ConfigError, RewardConfig
from optune_nemo.interfaces import Prompt
from optune_nemo.reward import build_reward
from optune_nemo.reward.base import RuleReward
from optune_nemo.reward.rules import arithmetic_reward, arithmetic_score, is_exact, length_reward


def _partial(x, answer):
    # the docstring's partial credit, written out
    return 0.5 * max(0.0, 1.0 - abs(x - answer) / max(abs(answer), 1.0))


# --------------------------------------------------------------------------- rules

@pytest.mark.parametrize("response,answer,expected", [
    ("42", 42, 1.0),
    ("The answer is 42.", 42, 1.0),
    ("40", 42, 0.5 * (1 - 2 / 42)),
    ("It is 45", 42, 0.5 * (1 - 3 / 42)),
    ("84", 42, 0.0),            # 100 % off: no credit
    ("500", 42, 0.0),           # beyond 100 %: clipped at 0
    ("I do not know", 42, -1.0),
    ("", 3, -1.0),
    ("42 or 41", 42, 0.5 * (1 - 1 / 42)),       # the last number is graded
    ("41 or 42", 42, 1.0),
    ("81 - 70 = 11.", 11, 1.0),                 # an equation: three numbers are free
    ("70 - 81 = -11", -11, 1.0),
    ("2 x 42 = 82.", 84, 0.5 * (1 - 2 / 84)),
    ("1 2 3 4 5", 5, 1.0 - 0.2),                # two numbers beyond three
    ("1 2 3 4 5 6 7 8", 8, 1.0 - 0.3),          # penalty capped at 0.3
    ("8 and 7", 7, 1.0),
    ("-7", -7, 1.0),
    ("7", -7, 0.0),
    ("-6", -7, 0.5 * (1 - 1 / 7)),
    ("1", 0, 0.0),              # |answer| < 1: denominator 1
    ("0.5", 0, 0.25),
    ("3.5", 3.5, 1.0),
    ("1,234", 1234, 1.0),       # thousands separators ignored
    ("12,345,678 exactly", 12345678, 1.0),
    ("x" * 49 + " 42", 42, 0.8),        # longer than 48 chars
    ("x" * 45 + " 42", 42, 1.0),        # exactly 48 chars: no penalty
    ("9 8 7 6 5 4 " + "y" * 60, 42, _partial(4, 42) - 0.3 - 0.2),
    ("no number here " * 5, 42, -1.0),  # no number: -1, whatever the length
])
def test_arithmetic_score(response, answer, expected):
    assert len("x" * 45 + " 42") == 48
    assert arithmetic_score(response, answer) == pytest.approx(expected, abs=1e-12)


def test_arithmetic_score_lower_bound_and_max_chars():
    # worst case with a number: 0 - 0.3 - 0.2 = -0.5, never below -1
    assert arithmetic_score("1000 2000 3000 4000 5000 6000 " + "z" * 80, 1) == pytest.approx(-0.5)
    assert arithmetic_score("42 apples", 42, max_chars=5) == pytest.approx(0.8)
    assert arithmetic_score("42 apples", 42, max_chars=9) == pytest.approx(1.0)


def test_arithmetic_score_range():
    responses = ["", "1", "41", "-3 4 5 6 7 8", "q" * 100, "42" + " 0" * 30, "0.001", "-999999"]
    for r in responses:
        for ans in (-50, -1, 0, 1, 42, 4900):
            assert -1.0 <= arithmetic_score(r, ans) <= 1.0


def test_arithmetic_reward_uses_metadata_answer():
    prompts = ["What is 2 + 2?", "What is 5 * 3?", "What is 9 - 4?"]
    responses = ["4", "16", "nothing"]
    metadata = [{"answer": 4}, {"answer": 15, "a": 5}, {"answer": 5}]
    got = arithmetic_reward(prompts, responses, metadata)
    assert got == pytest.approx([1.0, 0.5 * (1 - 1 / 15), -1.0])
    long = ["4 " + "w" * 20]
    assert arithmetic_reward(["p"], long, [{"answer": 4}], max_chars=10) == pytest.approx([0.8])


def test_is_exact():
    assert is_exact("The answer is 42.", 42)
    assert is_exact("42.0", 42)
    assert is_exact("-12", -12)
    assert is_exact("1,000", 1000)
    assert not is_exact("41", 42)
    assert is_exact("41 then 42", 42)       # the last number is the answer
    assert not is_exact("42 then 41", 42)
    assert is_exact("81 - 70 = 11.", 11)
    assert not is_exact("", 42)
    assert not is_exact("forty-two", 42)


def test_length_reward():
    got = length_reward(["p"] * 3, ["a" * 32, "a" * 16, "a" * 40], [{}] * 3, target_chars=32)
    assert got == pytest.approx([0.0, -0.5, -0.25])


# --------------------------------------------------------------------------- RuleReward

def _prompts(n):
    return [Prompt(100 + i, f"prompt {i}", (i,), {"answer": i}) for i in range(n)]


def test_reward_model_batches_and_orders():
    seen = []

    def fn(prompts, responses, metadata):
        seen.append((list(prompts), list(responses), [m["answer"] for m in metadata]))
        return [len(r) + 10 * m["answer"] for r, m in zip(responses, metadata, strict=True)]

    rm = RuleReward(fn, name="fn", batch_size=2)
    assert rm.name == "fn"
    ps = _prompts(5)
    responses = ["a", "bb", "ccc", "dddd", "eeeee"]
    got = rm.score(ps, responses)
    assert got == [1.0, 12.0, 23.0, 34.0, 45.0]
    assert all(isinstance(x, float) for x in got)
    assert rm.calls == 3 and rm.scored == 5
    assert [len(b[0]) for b in seen] == [2, 2, 1]
    assert seen[0] == (["prompt 0", "prompt 1"], ["a", "bb"], [0, 1])
    assert seen[2] == (["prompt 4"], ["eeeee"], [4])
    rm.score(ps[:3], responses[:3])
    assert rm.calls == 5 and rm.scored == 8


def test_reward_model_single_batch_and_empty():
    calls = []
    rm = RuleReward(lambda p, r, m: calls.append(1) or [0.0] * len(r), batch_size=64, name="zero")
    assert rm.name == "zero"
    assert rm.score(_prompts(5), ["x"] * 5) == [0.0] * 5
    assert rm.calls == 1
    assert rm.score([], []) == []
    assert rm.calls == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_reward_names_prompt_id(bad):
    rm = RuleReward(lambda p, r, m: [0.5, bad, 0.1][: len(r)], batch_size=3, name="my_reward")
    with pytest.raises(ValueError) as e:
        rm.score(_prompts(3), ["a", "b", "c"])
    msg = str(e.value)
    assert "101" in msg and "non-finite" in msg and "my_reward" in msg
    assert "100" not in msg and "102" not in msg


def test_non_finite_in_later_batch_names_its_prompt():
    rm = RuleReward(lambda p, r, m: [math.nan if t == "bad" else 1.0 for t in r], batch_size=2, name="f")
    with pytest.raises(ValueError, match="prompt id 103"):
        rm.score(_prompts(5), ["ok", "ok", "ok", "bad", "ok"])


def test_non_numeric_reward_raises():
    rm = RuleReward(lambda p, r, m: ["high"] * len(r), batch_size=4, name="f")
    with pytest.raises(ValueError, match="prompt id 100"):
        rm.score(_prompts(2), ["a", "b"])


@pytest.mark.parametrize("n_out", [0, 1, 3])
def test_wrong_length_raises(n_out):
    rm = RuleReward(lambda p, r, m: [1.0] * n_out, batch_size=8, name="short")
    with pytest.raises(ValueError, match=rf"returned {n_out} rewards for 2 responses"):
        rm.score(_prompts(2), ["a", "b"])


# --------------------------------------------------------------------------- build_reward

def test_build_reward_default_is_arithmetic():
    rm = build_reward(RewardConfig())
    assert rm.name == "optune_nemo.reward.rules.arithmetic_reward"
    assert rm.batch_size == RewardConfig().batch_size
    ps = [Prompt(0, "What is 2 + 3?", (1,), {"answer": 5}), Prompt(1, "What is 6 * 7?", (2,), {"answer": 42})]
    assert rm.score(ps, ["5", "40"]) == pytest.approx([1.0, 0.5 * (1 - 2 / 42)])


def test_build_reward_user_function_with_kwargs(tmp_path, monkeypatch):
    mod = "optune_test_user_reward_mod"
    (tmp_path / f"{mod}.py").write_text(
        "CALLS = []\n"
        "def score(prompts, responses, metadata, *, bonus=0.0, scale=1.0):\n"
        "    CALLS.append(len(responses))\n"
        "    return [scale * len(r) + bonus + m.get('w', 0) for r, m in zip(prompts, metadata)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, mod, raising=False)
    cfg = RewardConfig(function={"_target_": f"{mod}.score", "bonus": 0.25}, batch_size=2)
    rm = build_reward(cfg)
    assert rm.name == f"{mod}.score" and rm.batch_size == 2
    ps = [Prompt(i, "p" * (i + 1), (i,), {"w": 10 * i}) for i in range(3)]
    got = rm.score(ps, ["r0", "r1", "r2"])
    # len(prompt text) + bonus (passed through the node) + w from metadata; scale stays default 1.0
    assert got == pytest.approx([1 + 0.25, 2 + 0.25 + 10, 3 + 0.25 + 20])
    assert rm.calls == 2
    assert sys.modules[mod].CALLS == [2, 1]


def test_the_arithmetic_gold_reward_lives_with_its_task():
    """The built-in task keeps its gold reward; the default `_target_` (optune_nemo.reward.rules) names it."""
    from optune_nemo.data.tasks import arithmetic, get_task

    assert arithmetic_reward is arithmetic.arithmetic_reward and is_exact is arithmetic.is_exact
    ps = [Prompt(0, "What is 2 + 3?", (1,), {"answer": 5}), Prompt(1, "What is 6 * 7?", (2,), {"answer": 42})]
    gold = build_reward(RewardConfig(function={"_target_": get_task("arithmetic").gold_reward}))
    assert gold.score(ps, ["5", "40"]) == build_reward(RewardConfig()).score(ps, ["5", "40"])
    assert get_task("arithmetic").is_correct("so 42", {"answer": 42})


def test_the_family_check_names_what_each_type_needs(tmp_path):
    from optune_nemo.reward import check

    check(RewardConfig())
    check(RewardConfig(type="hf", path=str(tmp_path)))
    check(RewardConfig(type="megatron", path=str(tmp_path)))
    check(RewardConfig(type="remote", url="grpc://host:8001"))
    bad = [(RewardConfig(type="mystery"), "reward.type: must be one of rule, hf, megatron, remote (got 'mystery')"),
           (RewardConfig(function={"scale": 2}), "reward.function: must be a node with a `_target_` naming a callable"),
           (RewardConfig(type="hf"), "reward.path: reward.type=hf needs an existing reward model directory (got None)"),
           (RewardConfig(type="megatron", path=str(tmp_path / "no")),
            f"reward.path: reward.type=megatron needs an existing reward model directory (got '{tmp_path / 'no'}')"),
           (RewardConfig(type="remote", url="host:8000"), "reward.url: reward.type=remote needs the server's URL, "
                                                           "http://host:port or grpc://host:port (got 'host:8000')")]
    for cfg, message in bad:
        with pytest.raises(ConfigError) as e:
            check(cfg)
        assert str(e.value) == message


@pytest.mark.parametrize("target", ["no_such_module_for_optune_tests.fn",
                                    "optune_nemo.reward.rules.no_such_function"])
def test_build_reward_bad_target(target):
    with pytest.raises(ConfigError) as e:
        build_reward(RewardConfig(function={"_target_": target}))
    msg = str(e.value)
    assert "reward.function._target_" in msg and target in msg


def test_numpy_and_torch_scalars_are_numbers():
    import numpy as np
    import torch

    prompts = [Prompt(0, "p", (1,)), Prompt(1, "q", (2,))]
    rm = RuleReward(lambda p, r, m: [np.float32(0.5), torch.tensor(-1.5)], batch_size=8, name="f")
    assert rm.score(prompts, ["a", "b"]) == [0.5, -1.5]
    with pytest.raises(ValueError, match="not a number.*prompt id 1"):
        RuleReward(lambda p, r, m: [1.0, "high"], batch_size=8, name="f").score(prompts, ["a", "b"])


def test_function_that_raises_is_a_config_error_naming_it():
    def broken(prompts, responses, metadata):
        raise KeyError("answer")

    with pytest.raises(ConfigError) as e:
        RuleReward(broken, batch_size=8, name="my.broken").score(_prompts(2), ["a", "b"])
    assert str(e.value) == "reward.function: my.broken raised KeyError: 'answer'"
