"""Win-score judges (optune_nemo/evaluation/judge.py): eq. 7 on hand-counted outcomes, the two-order rule's whole
truth table, the reward judge's tie margin on hand-picked rewards, score-line parsing, and the llm judge's
requests and answer handling through a stub chat client (a real server: tests/e2e/test_llm_judge.py)."""

from __future__ import annotations

import itertools
import threading
from types import SimpleNamespace

import pytest

from optune_nemo.config import ConfigError, EvalConfig
from optune_nemo.evaluation.judge import (
    HAVE_OPENAI,
    NO_KEY,
    JudgeResult,
    LLMJudge,
    RewardJudge,
    build_judge,
    combine_orders,
    parse_scores,
    win_score,
)
from optune_nemo.reward.base import RewardUnavailable

# --------------------------------------------------------------------------- eq. 7


@pytest.mark.parametrize("outcomes,expected", [
    (("win", "win", "lose", "tie"), 75.0),          # 50 + 100 * (2 - 1) / 4
    (("win",) * 3, 150.0),                          # the range is [-50, 150]
    (("lose",) * 5, -50.0),
    (("tie", "tie"), 50.0),
    (("win", "lose", "lose", "tie", "tie"), 30.0),  # 50 + 100 * (1 - 2) / 5
    (("win", "tie", "tie", "tie", "tie", "tie", "tie", "tie"), 62.5),
])
def test_win_score_eq7(outcomes, expected):
    result = JudgeResult(outcomes)
    assert result.win_score == pytest.approx(expected, abs=1e-12)
    assert win_score(outcomes.count("win"), outcomes.count("lose"), len(outcomes)) == pytest.approx(expected)
    summary = result.summary()
    assert (summary["wins"], summary["losses"], summary["ties"], summary["num_prompts"]) == (
        outcomes.count("win"), outcomes.count("lose"), outcomes.count("tie"), len(outcomes))


def test_win_score_rejects_impossible_counts():
    with pytest.raises(ValueError):
        win_score(0, 0, 0)
    with pytest.raises(ValueError):
        win_score(3, 2, 4)


# --------------------------------------------------------------------------- the two-order rule

# written out by hand from the paper's rule (>= 1 win, <= 1 tie -> win; mirrored for lose; else tie),
# with (win, lose) a tie as in AlpaGasus, and an invalid answer counted as a tie
TRUTH_TABLE = {
    ("win", "win"): "win", ("win", "tie"): "win", ("tie", "win"): "win",
    ("lose", "lose"): "lose", ("lose", "tie"): "lose", ("tie", "lose"): "lose",
    ("tie", "tie"): "tie", ("win", "lose"): "tie", ("lose", "win"): "tie",
    ("invalid", "win"): "win", ("win", "invalid"): "win",
    ("invalid", "lose"): "lose", ("lose", "invalid"): "lose",
    ("invalid", "tie"): "tie", ("tie", "invalid"): "tie", ("invalid", "invalid"): "tie",
}


def test_two_order_truth_table_is_complete():
    assert set(TRUTH_TABLE) == set(itertools.product(("win", "lose", "tie", "invalid"), repeat=2))


@pytest.mark.parametrize("pair", sorted(TRUTH_TABLE))
def test_two_order_rule(pair):
    assert combine_orders(*pair) == TRUTH_TABLE[pair]


def test_two_order_rule_rejects_unknown_verdicts():
    with pytest.raises(ValueError):
        combine_orders("win", "better")


# --------------------------------------------------------------------------- reward judge


def test_reward_judge_tie_margin():
    judge = RewardJudge(tie_margin=0.1)
    cand = [1.0, 0.55, 0.30, 0.0, 0.2, -1.0]
    base = [0.5, 0.50, 0.35, 0.2, 0.0, -0.95]
    # gaps 0.5, 0.05, -0.05, -0.2, 0.2, -0.05 against the margin 0.1
    result = judge.compare(["q"] * 6, ["c"] * 6, ["b"] * 6, candidate_rewards=cand, baseline_rewards=base)
    assert result.outcomes == ("win", "tie", "tie", "lose", "win", "tie")
    assert result.win_score == pytest.approx(50 + 100 * (2 - 1) / 6)
    assert result.n_invalid == 0


def test_reward_judge_zero_margin_equal_rewards_tie():
    result = RewardJudge(tie_margin=0.0).compare(["a", "b", "c"], ["x"] * 3, ["y"] * 3,
                                                  candidate_rewards=[1.0, 0.5, 0.25],
                                                  baseline_rewards=[0.5, 0.5, 0.5])
    assert result.outcomes == ("win", "tie", "lose") and result.win_score == 50.0


def test_reward_judge_needs_rewards_and_matching_lengths():
    judge = RewardJudge(tie_margin=0.0)
    with pytest.raises(ValueError, match="candidate_rewards"):
        judge.compare(["q"], ["c"], ["b"])
    with pytest.raises(ValueError, match="2 entries for 1 prompts"):
        judge.compare(["q"], ["c"], ["b"], candidate_rewards=[1.0, 2.0], baseline_rewards=[0.0])
    with pytest.raises(ValueError, match="finite"):
        judge.compare(["q"], ["c"], ["b"], candidate_rewards=[float("nan")], baseline_rewards=[0.0])


# --------------------------------------------------------------------------- score lines


@pytest.mark.parametrize("text,expected", [
    ("8 6", (8.0, 6.0)),
    ("8 6\nAssistant 1 gave more detail.", (8.0, 6.0)),
    ("\n\n  7 9  \nbecause", (7.0, 9.0)),
    ("8, 6", (8.0, 6.0)),
    ("7.5 6", (7.5, 6.0)),
    ("**9 3**", (9.0, 3.0)),
    ("Assistant 1: 4 Assistant 2: 10", (4.0, 10.0)),
    ("10 10", (10.0, 10.0)),
    ("", None),
    (None, None),
    ("8", None),
    ("8 6 5", None),
    ("0 6", None),
    ("11 3", None),
    ("I would give 8 and 6", None),
    ("The first answer is better.\n8 6", None),   # the scores must be on the first line
])
def test_parse_scores(text, expected):
    assert parse_scores(text) == expected


# --------------------------------------------------------------------------- llm judge, stub client


class StubClient:
    """`client.chat.completions.create(**kwargs)` answering from a function of the request; records calls."""

    def __init__(self, answer):
        self.answer, self.calls, self._lock = answer, [], threading.Lock()
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self._create))

    def _create(self, **kwargs):
        with self._lock:
            self.calls.append(kwargs)
        text = self.answer(kwargs)
        if isinstance(text, Exception):
            raise text
        if text is _NO_CHOICES:
            return SimpleNamespace(choices=[])
        return SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(content=text))])


_NO_CHOICES = object()


def _first_shown(kwargs, a: str, b: str) -> str:
    user = kwargs["messages"][-1]["content"]
    return a if user.index(a) < user.index(b) else b


QUESTIONS = ["What is 2+3?", "Name a colour.", "Capital of France?", "Say hi.", "Count to 3."]
CAND = ["CAND-five", "CAND-blue", "CAND-paris", "CAND-hi", "CAND-123"]
BASE = ["BASE-seven", "BASE-none", "BASE-rome", "BASE-bye", "BASE-12"]
# per prompt: the judge's answer when the candidate is shown first, and when the baseline is shown first
SCRIPT = {
    0: ("8 3", "3 8"),                           # win, win         -> win
    1: ("garbage", "9 2"),                       # invalid, lose    -> lose
    2: ("7 4\nfirst is better", "7 4"),          # win, lose        -> tie (position bias)
    3: (None, _NO_CHOICES),                      # invalid, invalid -> tie
    4: ("5 5", "2 6\nthe second"),               # tie, win         -> win
}


def _scripted(kwargs):
    user = kwargs["messages"][-1]["content"]
    i = next(k for k, q in enumerate(QUESTIONS) if q in user)
    return SCRIPT[i][0 if _first_shown(kwargs, CAND[i], BASE[i]) == CAND[i] else 1]


def _judge(client, **kw):
    return LLMJudge(client, model="judge-model", max_tokens=77, url="http://judge:8000/v1", key_env="JUDGE_KEY",
                    **kw)


def test_llm_judge_asks_both_orders_and_applies_the_rule():
    client = StubClient(_scripted)
    result = _judge(client).compare(QUESTIONS, CAND, BASE)
    assert result.outcomes == ("win", "lose", "tie", "tie", "win")
    assert result.verdicts == (("win", "win"), ("invalid", "lose"), ("win", "lose"), ("invalid", "invalid"),
                               ("tie", "win"))
    assert result.n_invalid == 3
    assert result.win_score == pytest.approx(50 + 100 * (2 - 1) / 5)
    assert len(client.calls) == 2 * len(QUESTIONS)
    for i, q in enumerate(QUESTIONS):
        mine = [c for c in client.calls if q in c["messages"][-1]["content"]]
        assert sorted(_first_shown(c, CAND[i], BASE[i]) for c in mine) == sorted([CAND[i], BASE[i]])
    for call in client.calls:
        assert call["model"] == "judge-model" and call["max_tokens"] == 77 and call["temperature"] == 0.0
        system, user = call["messages"]
        assert system["role"] == "system" and user["role"] == "user"
        assert "1 to 10" in user["content"] and "first line" in user["content"]
        assert user["content"].index("Assistant 1") < user["content"].index("Assistant 2")


def test_llm_judge_needs_matching_lengths():
    with pytest.raises(ValueError, match="baseline has 1 entries for 2 prompts"):
        _judge(StubClient(lambda kw: "5 5")).compare(["a", "b"], ["x", "y"], ["z"])


class StatusError(Exception):
    """What the openai client raises for an HTTP error answer: a status code and the server's body."""

    def __init__(self, status, body):
        super().__init__(f"Error code: {status}")
        self.status_code, self.body = status, body


@pytest.mark.parametrize("status,key", [(401, "eval.judge_api_key_env"), (403, "eval.judge_api_key_env"),
                                        (400, "eval.judge_model"), (404, "eval.judge_model")])
def test_refused_requests_are_config_errors_without_the_key(status, key):
    secret = "sk-very-secret-123"
    client = StubClient(lambda kw: StatusError(status, {"error": {"message": f"bad key {secret} given"}}))
    with pytest.raises(ConfigError) as info:
        _judge(client, secret=secret).compare(["q"], ["c"], ["b"])
    message = str(info.value)
    assert message.startswith(key) and "http://judge:8000/v1" in message and "\n" not in message
    assert secret not in message and "***" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_server_errors_are_unavailable():
    client = StubClient(lambda kw: StatusError(502, {"detail": "bad gateway"}))
    with pytest.raises(RewardUnavailable, match=r"^eval\.judge_url: .*http://judge:8000/v1"):
        _judge(client).compare(["q"], ["c"], ["b"])


# --------------------------------------------------------------------------- builder


def test_build_reward_judge():
    judge = build_judge(EvalConfig(judge="reward", tie_margin=0.25))
    assert isinstance(judge, RewardJudge) and judge.tie_margin == 0.25


def test_build_llm_judge_needs_url_and_model():
    if not HAVE_OPENAI:
        pytest.skip("openai is not installed (the transformers[serving] extra brings it)")
    with pytest.raises(ConfigError, match="^eval.judge_url"):
        build_judge(EvalConfig(judge="llm", judge_url=None, judge_model="m"))


def test_build_llm_judge_without_openai_says_what_to_install():
    if HAVE_OPENAI:
        pytest.skip("openai is installed")
    with pytest.raises(ConfigError, match="^eval.judge: llm needs the openai client"):
        build_judge(EvalConfig(judge="llm", judge_url="http://x/v1", judge_model="m"))


@pytest.mark.parametrize("value", [None, "sk-from-env"])
def test_build_llm_judge_reads_the_key_from_the_named_variable(monkeypatch, value):
    if not HAVE_OPENAI:
        pytest.skip("openai is not installed (the transformers[serving] extra brings it)")
    monkeypatch.delenv("MY_JUDGE_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-be-used")
    if value:
        monkeypatch.setenv("MY_JUDGE_KEY", value)
    judge = build_judge(EvalConfig(judge="llm", judge_url="http://judge:8000/v1", judge_model="m",
                                   judge_api_key_env="MY_JUDGE_KEY", judge_timeout_s=7.0))
    assert judge.client.api_key == (value or NO_KEY)
    assert str(judge.client.base_url).rstrip("/") == "http://judge:8000/v1"
    assert judge.client.timeout == 7.0
