"""Rule-based rewards: plain functions `fn(prompts, responses, metadata, **kwargs) -> list[float]`."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def arithmetic_score(response: str, answer: float, *, max_chars: int = 48, free_numbers: int = 3) -> float:
    """Graded reward in [-1, 1] for an arithmetic answer.

    - no number in the response: -1
    - x = the LAST number (the conclusion: "81 - 70 = 11" answers 11): 1 if x == answer, else
      0.5 * max(0, 1 - |x - answer| / max(|answer|, 1)) (partial credit falling linearly with the
      relative error, 0 beyond 100 %)
    - rambling: minus 0.1 per number beyond `free_numbers` (an equation "a op b = c" is free; at most
      0.3) and 0.2 when longer than `max_chars`.
    """
    numbers = _NUMBER.findall(response.replace(",", ""))
    if not numbers:
        return -1.0
    x = float(numbers[-1])
    if x == answer:
        score = 1.0
    else:
        score = 0.5 * max(0.0, 1.0 - abs(x - answer) / max(abs(answer), 1.0))
    score -= min(0.3, 0.1 * max(0, len(numbers) - free_numbers))
    if len(response) > max_chars:
        score -= 0.2
    return max(-1.0, score)


def arithmetic_reward(prompts: list[str], responses: list[str], metadata: list[dict], *,
                      max_chars: int = 48) -> list[float]:
    """`arithmetic_score` of each response against `metadata["answer"]`."""
    return [arithmetic_score(r, m["answer"], max_chars=max_chars) for r, m in zip(responses, metadata)]


def length_reward(prompts: list[str], responses: list[str], metadata: list[dict], *,
                  target_chars: int = 32) -> list[float]:
    """-|len(response) - target| / target: a task-free example of a rule-based reward."""
    return [-abs(len(r) - target_chars) / target_chars for r in responses]


def is_exact(response: str, answer: float) -> bool:
    """True when the last number in the response (its conclusion) equals the answer."""
    numbers = _NUMBER.findall(response.replace(",", ""))
    return bool(numbers) and float(numbers[-1]) == answer
