"""Win-score judges: is a candidate answer better than, worse than, or as good as a baseline answer?

The win score of the paper (eq. 7) over n prompts:

    win_score = 50 + 100 * (n_win - n_lose) / n

It lies in [-50, 150]: 50 means as good as the baseline on balance, 150 better on every prompt, -50
worse on every prompt. Two judges
(`eval.judge`) decide the outcome per prompt:

- `reward`: the candidate wins when its reward exceeds the baseline's by more than `eval.tie_margin`,
  loses when it is lower by more than that, and ties otherwise.
- `llm`: the paper's pairwise LLM judge (Appendix F, the Vicuna rating prompt, restated in our own
  words in `judge_messages`): the judge scores both answers from 1 to 10 on its first line. To cancel
  the judge's position bias it is asked twice, once with the candidate shown first and once with the
  baseline shown first; each order gives a verdict for the candidate (higher score: win, equal: tie),
  and `combine_orders` turns the two verdicts into the outcome. An answer without a parseable score
  line counts as invalid (`n_invalid`, per answer, so 0..2n) and as a tie for that order. Given the
  prompts' conversations (`conversations=`), the judge also sees every turn before the question (a system
  message, earlier user and assistant turns); a one-turn conversation gives the same request as none.

The llm judge talks to any OpenAI-compatible chat endpoint (vLLM, TensorRT-LLM serve, NIM, `transformers
serve`, a hosted API) through the `openai` client. The API key is read from the environment variable
named by `eval.judge_api_key_env`; it is handed to the client and never logged, written or put into an
error message. An endpoint that stays unreachable after the client's bounded retries raises
`RewardUnavailable` (exit 1: rerun to resume); a request the endpoint refuses (wrong model name, key or
path) raises `ConfigError` naming the key to fix.

`compare` is pure: no collectives, no files. In a multi-rank run call it on one rank (the llm judge
would otherwise send every request once per rank) and share the result.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from optune_nemo.config import ConfigError, EvalConfig
from optune_nemo.reward.base import RewardUnavailable

try:
    import openai

    HAVE_OPENAI = True
except ImportError:   # only the llm judge needs it
    HAVE_OPENAI = False

log = logging.getLogger(__name__)

WIN, LOSE, TIE = "win", "lose", "tie"
OUTCOMES = (WIN, LOSE, TIE)
INVALID = "invalid"
"""The verdict of one order whose judge answer had no parseable score line (counted as a tie)."""

NO_KEY = "no-key"
"""Sent when the key's environment variable is unset: local servers (vLLM, transformers serve) accept
any key, and the client refuses to start without one."""
MAX_RETRIES = 3
"""Retries of one judge request by the openai client (exponential back-off; connection errors, timeouts,
429 and 5xx answers) before the endpoint counts as unreachable."""
REQUESTS_IN_FLIGHT = 8
"""Judge requests sent concurrently: serving engines batch concurrent requests, so the evaluation takes
about 2n / 8 request latencies instead of 2n."""


# --------------------------------------------------------------------------- scores and outcomes


def win_score(n_win: int, n_lose: int, n: int) -> float:
    """The paper's eq. 7: 50 + 100 * (n_win - n_lose) / n."""
    if n <= 0:
        raise ValueError(f"win score: needs at least one prompt (got n={n})")
    if n_win < 0 or n_lose < 0 or n_win + n_lose > n:
        raise ValueError(f"win score: need 0 <= n_win + n_lose <= n (got {n_win}, {n_lose}, {n})")
    return 50.0 + 100.0 * (n_win - n_lose) / n


def reward_outcome(candidate: float, baseline: float, tie_margin: float) -> str:
    """`win` when candidate - baseline > tie_margin, `lose` when < -tie_margin, else `tie`."""
    if not (math.isfinite(candidate) and math.isfinite(baseline)):
        raise ValueError(f"reward judge: rewards must be finite (got {candidate!r}, {baseline!r})")
    gap = candidate - baseline
    if gap > tie_margin:
        return WIN
    if gap < -tie_margin:
        return LOSE
    return TIE


def combine_orders(first: str, second: str) -> str:
    """The outcome for the candidate from its verdicts in the two answer orders (each win, lose, tie or
    invalid; invalid counts as a tie).

    The paper (Sec. 4, after Chen et al. 2024a, AlpaGasus): a response wins when it gets at least one win
    and no more than one tie. Read literally, (win, lose) would satisfy both that rule and its mirror
    image for losing; AlpaGasus, whose protocol the paper follows, counts it as a tie, and so do we:

        win:  (win, win), (win, tie), (tie, win)
        lose: (lose, lose), (lose, tie), (tie, lose)
        tie:  (tie, tie), (win, lose), (lose, win)
    """
    verdicts = [TIE if v == INVALID else v for v in (first, second)]
    for v in verdicts:
        if v not in OUTCOMES:
            raise ValueError(f"verdict: must be one of {', '.join(OUTCOMES + (INVALID,))} (got {v!r})")
    wins, losses, ties = verdicts.count(WIN), verdicts.count(LOSE), verdicts.count(TIE)
    if wins >= 1 and ties <= 1 and losses == 0:
        return WIN
    if losses >= 1 and ties <= 1 and wins == 0:
        return LOSE
    return TIE


@dataclass(frozen=True)
class JudgeResult:
    """Per-prompt outcomes of a comparison, in prompt order."""

    outcomes: tuple[str, ...]
    """`win`, `lose` or `tie` for the candidate, one per prompt."""
    n_invalid: int = 0
    """llm judge: judge answers without a parseable score line (of 2 per prompt); each counted as a tie."""
    verdicts: tuple[tuple[str, str], ...] = ()
    """llm judge: per prompt, the candidate's verdict with the candidate shown first, then with the
    baseline shown first (`win`, `lose`, `tie` or `invalid`)."""
    judge_texts: tuple[tuple[str, str], ...] = ()
    """llm judge: per prompt, the judge's answers in the same two orders."""

    @property
    def n(self) -> int:
        return len(self.outcomes)

    @property
    def n_win(self) -> int:
        return self.outcomes.count(WIN)

    @property
    def n_lose(self) -> int:
        return self.outcomes.count(LOSE)

    @property
    def n_tie(self) -> int:
        return self.outcomes.count(TIE)

    @property
    def win_score(self) -> float:
        """eq. 7 over these outcomes."""
        return win_score(self.n_win, self.n_lose, self.n)

    def summary(self) -> dict:
        """The numbers an evaluation record keeps (metrics.jsonl prefixes them with `eval_`)."""
        return {"win_score": self.win_score, "wins": self.n_win, "losses": self.n_lose, "ties": self.n_tie,
                "invalid": self.n_invalid, "num_prompts": self.n}


class Judge(Protocol):
    """Compares a candidate's answers with a baseline's, prompt by prompt."""

    name: str

    def compare(self, prompts: Sequence[str], candidate: Sequence[str], baseline: Sequence[str], *,
                candidate_rewards: Sequence[float] | None = None,
                baseline_rewards: Sequence[float] | None = None,
                conversations: Sequence[Sequence[dict]] | None = None) -> JudgeResult:
        """`prompts[i]` (the question as the user wrote it, before any chat template) answered by
        `candidate[i]` and `baseline[i]`; the rewards of those answers when the caller has them;
        `conversations[i]` the whole conversation whose last user turn is `prompts[i]`
        (`Prompt.conversation()`) when the caller has it."""
        ...


def _check_lengths(prompts, candidate, baseline, *rewards, conversations=None) -> None:
    n = len(prompts)
    if n == 0:
        raise ValueError("judge: no prompts to compare")
    for name, seq in (("candidate", candidate), ("baseline", baseline),
                      ("candidate_rewards", rewards[0]), ("baseline_rewards", rewards[1]),
                      ("conversations", conversations)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"judge: {name} has {len(seq)} entries for {n} prompts")


# --------------------------------------------------------------------------- reward judge


class RewardJudge:
    """The answer with the higher reward wins; rewards closer than `tie_margin` tie."""

    name = "reward"

    def __init__(self, *, tie_margin: float):
        if tie_margin < 0:
            raise ValueError(f"eval.tie_margin: must be >= 0 (got {tie_margin})")
        self.tie_margin = tie_margin

    def compare(self, prompts, candidate, baseline, *, candidate_rewards=None, baseline_rewards=None,
                conversations=None) -> JudgeResult:
        # the rewards were computed on the whole conversations already: nothing here reads them
        if candidate_rewards is None or baseline_rewards is None:
            raise ValueError("reward judge: needs candidate_rewards and baseline_rewards")
        _check_lengths(prompts, candidate, baseline, candidate_rewards, baseline_rewards)
        return JudgeResult(tuple(reward_outcome(float(c), float(b), self.tie_margin)
                                 for c, b in zip(candidate_rewards, baseline_rewards)))


# --------------------------------------------------------------------------- llm judge

SYSTEM_PROMPT = "You are a careful and impartial reviewer who checks how good the answers of AI assistants are."

_CONTEXT_TEMPLATE = """\
[Conversation before the question: start]
{turns}
[Conversation before the question: end]

"""

_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}

_USER_TEMPLATE = """\
{context}[User question]
{question}

[Answer of Assistant 1: start]
{answer_1}
[Answer of Assistant 1: end]

[Answer of Assistant 2: start]
{answer_2}
[Answer of Assistant 2: end]

Please review how well each of the two AI assistants answered the user question above. Judge how helpful, \
relevant and accurate each answer is, and how much useful detail it gives. Give each assistant one overall \
score from 1 to 10, where a higher score means a better answer.
Write the two scores alone on the first line, Assistant 1's score first, separated by one space. From the \
second line on, explain your scores. Stay impartial: the order in which the answers are shown must not \
influence your judgement."""


def earlier_turns(conversation: Sequence[dict] | None) -> list[dict]:
    """The turns of a conversation before its last user turn (the question)."""
    turns = list(conversation or ())
    last_user = max((i for i, m in enumerate(turns) if m["role"] == "user"), default=len(turns))
    return turns[:last_user]


def judge_messages(question: str, answer_1: str, answer_2: str, *,
                   conversation: Sequence[dict] | None = None) -> list[dict]:
    """The chat request for one order: `answer_1` is shown as Assistant 1's answer. The turns of
    `conversation` before its last user turn are shown before the question, one `Role: content` block
    each; without any (no conversation, or a one-turn one) the request is the question alone."""
    turns = earlier_turns(conversation)
    context = _CONTEXT_TEMPLATE.format(turns="\n\n".join(
        f"{_ROLE_NAMES.get(m['role'], m['role'])}: {m['content']}" for m in turns)) if turns else ""
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": _USER_TEMPLATE.format(context=context, question=question,
                                                              answer_1=answer_1, answer_2=answer_2)}]


_NUMBER = r"\d+(?:\.\d+)?"
_LABEL = re.compile(r"(?i)\b(?:assistant|answer)\s*[12]\b\s*[:=]?")


def parse_scores(text: str | None) -> tuple[float, float] | None:
    """The two scores on the first non-empty line of a judge answer ("8 6", "8, 6", "Assistant 1: 8
    Assistant 2: 6", "**8 6**"), or None when that line holds anything but exactly two numbers in
    [1, 10] with separators."""
    if not text:
        return None
    line = next((s for s in text.splitlines() if s.strip()), "")
    line = _LABEL.sub(" ", line)
    numbers = re.findall(_NUMBER, line)
    rest = re.sub(_NUMBER, " ", line)
    if len(numbers) != 2 or re.search(r"[^\W_]", rest):   # letters or digits left: prose, not a score line
        return None
    s1, s2 = float(numbers[0]), float(numbers[1])
    if not (1 <= s1 <= 10 and 1 <= s2 <= 10):
        return None
    return s1, s2


def order_verdict(scores: tuple[float, float] | None, *, candidate_first: bool) -> str:
    """The candidate's verdict in one order from the judge's (Assistant 1, Assistant 2) scores."""
    if scores is None:
        return INVALID
    cand, base = scores if candidate_first else scores[::-1]
    return WIN if cand > base else LOSE if cand < base else TIE


class LLMJudge:
    """The paper's pairwise LLM judge through an OpenAI-compatible chat client (see the module docstring).
    `client` is an `openai.OpenAI` (or any object with `chat.completions.create` of the same signature);
    `secret` is the API key, used only to keep it out of error messages."""

    name = "llm"

    def __init__(self, client, *, model: str, max_tokens: int, url: str, key_env: str, secret: str = "",
                 requests_in_flight: int = REQUESTS_IN_FLIGHT):
        self.client, self.model, self.max_tokens = client, model, max_tokens
        self.url, self.key_env, self.requests_in_flight = url, key_env, requests_in_flight
        self._secret = secret

    def compare(self, prompts, candidate, baseline, *, candidate_rewards=None, baseline_rewards=None,
                conversations=None) -> JudgeResult:
        _check_lengths(prompts, candidate, baseline, candidate_rewards, baseline_rewards,
                       conversations=conversations)
        requests = []
        convs = conversations if conversations is not None else [None] * len(prompts)
        for q, c, b, conv in zip(prompts, candidate, baseline, convs):
            # candidate first, then baseline first
            requests += [judge_messages(q, c, b, conversation=conv), judge_messages(q, b, c, conversation=conv)]
        with ThreadPoolExecutor(max_workers=self.requests_in_flight) as pool:
            try:
                texts = list(pool.map(self.ask, requests))
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        verdicts, outcomes, n_invalid = [], [], 0
        for i in range(len(prompts)):
            first = order_verdict(parse_scores(texts[2 * i]), candidate_first=True)
            second = order_verdict(parse_scores(texts[2 * i + 1]), candidate_first=False)
            n_invalid += (first == INVALID) + (second == INVALID)
            verdicts.append((first, second))
            outcomes.append(combine_orders(first, second))
        if n_invalid:
            log.warning("llm judge: %d of %d answers had no parseable score line (counted as ties)",
                        n_invalid, len(texts))
        return JudgeResult(tuple(outcomes), n_invalid, tuple(verdicts),
                           tuple((texts[2 * i], texts[2 * i + 1]) for i in range(len(prompts))))

    def check(self) -> None:
        """One one-token request: raises now (RewardUnavailable / ConfigError) what `compare` would raise
        later, so a run can check its judge before it starts training."""
        self.ask([{"role": "user", "content": "Reply with OK."}], max_tokens=1)

    def ask(self, messages: list[dict], max_tokens: int | None = None) -> str:
        """The judge's answer text ('' when it returned none); errors per the module docstring."""
        try:
            response = self.client.chat.completions.create(
                model=self.model, messages=messages, max_tokens=max_tokens or self.max_tokens, temperature=0.0)
        except Exception as e:
            raise self._error(e) from None     # the chained exception could carry request headers
        choices = getattr(response, "choices", None) or []
        content = getattr(getattr(choices[0], "message", None), "content", None) if choices else None
        return content if isinstance(content, str) else ""

    def _error(self, e: Exception) -> Exception:
        detail = self._scrub(_first_line(_body_message(e) or str(e) or type(e).__name__))
        if HAVE_OPENAI and isinstance(e, (openai.APIConnectionError, openai.RateLimitError,
                                          openai.InternalServerError)):
            return RewardUnavailable(f"eval.judge_url: the judge at {self.url} did not answer after "
                                     f"{MAX_RETRIES} retries ({type(e).__name__}: {detail})")
        status = getattr(e, "status_code", None)
        if status in (401, 403):
            return ConfigError(f"eval.judge_api_key_env: the judge at {self.url} refused the key in "
                               f"${self.key_env} ({detail})")
        if status is not None and 400 <= status < 500:
            return ConfigError(f"eval.judge_model: the judge at {self.url} refused a request for model "
                               f"{self.model!r} ({detail}); check eval.judge_model and eval.judge_url")
        if status is not None:
            return RewardUnavailable(f"eval.judge_url: the judge at {self.url} failed ({detail})")
        return RuntimeError(f"llm judge at {self.url}: {type(e).__name__}: {detail}")

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text


def _body_message(e: Exception) -> str:
    """The server's own explanation in an error body (OpenAI: {"error": {"message"}}, FastAPI: {"detail"})."""
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        for key in ("message", "detail"):
            if isinstance(inner.get(key), str):
                return f"{getattr(e, 'status_code', '')} {inner[key]}".strip()
    return ""


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:300] if text.strip() else ""


# --------------------------------------------------------------------------- builder


def build_judge(eval_cfg: EvalConfig) -> Judge:
    """The judge named by `eval.judge`."""
    if eval_cfg.judge == "reward":
        return RewardJudge(tie_margin=eval_cfg.tie_margin)
    if eval_cfg.judge != "llm":
        raise ConfigError(f"eval.judge: must be one of reward, llm (got {eval_cfg.judge!r})")
    if not HAVE_OPENAI:
        raise ConfigError("eval.judge: llm needs the openai client (pip install 'openai>=1.98')")
    if not (eval_cfg.judge_url and eval_cfg.judge_model):
        raise ConfigError("eval.judge_url: the llm judge needs eval.judge_url (an OpenAI-compatible base URL) "
                          "and eval.judge_model")
    key = os.environ.get(eval_cfg.judge_api_key_env) or ""
    log.info("llm judge: %s at %s, key from $%s%s", eval_cfg.judge_model, eval_cfg.judge_url,
             eval_cfg.judge_api_key_env, "" if key else " (unset: sending a placeholder)")
    client = openai.OpenAI(base_url=eval_cfg.judge_url, api_key=key or NO_KEY, timeout=eval_cfg.judge_timeout_s,
                           max_retries=MAX_RETRIES)
    return LLMJudge(client, model=eval_cfg.judge_model, max_tokens=eval_cfg.judge_max_tokens,
                    url=eval_cfg.judge_url, key_env=eval_cfg.judge_api_key_env, secret=key)
