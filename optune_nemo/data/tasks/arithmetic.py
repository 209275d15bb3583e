"""Built-in task: natural arithmetic questions with an exact integer answer, and its gold reward.

Deterministic for a seed; train and held-out splits are disjoint by construction (a question's
split is a function of its operands and operator, not of the draw order). The gold reward is the rule
`arithmetic_reward` (also reachable as `optune_nemo.reward.rules.arithmetic_reward`, the default
`reward.function._target_`).
"""

from __future__ import annotations

import hashlib
import random
import re

from optune_nemo.data.tasks import TASKS, Task

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")

_TEMPLATES = {
    "+": ["What is {a} + {b}?", "Compute {a} plus {b}.", "How much is {a} + {b}?",
          "Add {a} and {b}.", "What do you get when you add {a} to {b}?"],
    "-": ["What is {a} - {b}?", "Compute {a} minus {b}.", "How much is {a} minus {b}?",
          "Subtract {b} from {a}.", "What is {b} less than {a}?"],
    "*": ["What is {a} * {b}?", "Compute {a} times {b}.", "How much is {a} multiplied by {b}?",
          "Multiply {a} by {b}.", "What is the product of {a} and {b}?"],
}


def _split_of(a: int, op: str, b: int) -> str:
    h = hashlib.blake2b(f"{a}{op}{b}".encode(), digest_size=2).digest()
    return "heldout" if int.from_bytes(h, "little") % 5 == 0 else "train"


def _operands(rng: random.Random, op: str) -> tuple[int, int]:
    if op == "*":
        return rng.randint(2, 9), rng.randint(11, 49)
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return (max(a, b), min(a, b)) if op == "-" else (a, b)


def arithmetic_problems(n: int, *, seed: int, split: str = "train") -> list[dict]:
    """`n` distinct problems of `split` (`train` | `heldout`): {prompt, answer, a, b, op}."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be train or heldout (got {split!r})")
    rng, seen, out = random.Random(seed), set(), []
    for _ in range(200 * n + 1000):
        if len(out) == n:
            break
        op = rng.choice("+-*")
        a, b = _operands(rng, op)
        if (a, op, b) in seen or _split_of(a, op, b) != split:
            continue
        seen.add((a, op, b))
        answer = a + b if op == "+" else a - b if op == "-" else a * b
        out.append({"prompt": rng.choice(_TEMPLATES[op]).format(a=a, b=b), "answer": answer,
                    "a": a, "b": b, "op": op})
    if len(out) < n:
        raise ValueError(f"data.num_prompts: the arithmetic task has fewer than {n} {split} questions")
    return out


# --------------------------------------------------------------------------- the gold reward


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


def is_exact(response: str, answer: float) -> bool:
    """True when the last number in the response (its conclusion) equals the answer."""
    numbers = _NUMBER.findall(response.replace(",", ""))
    return bool(numbers) and float(numbers[-1]) == answer


TASKS.register("arithmetic")(Task("arithmetic", arithmetic_problems,
                                  gold_reward="optune_nemo.data.tasks.arithmetic.arithmetic_reward",
                                  is_correct=lambda response, meta: is_exact(response, meta["answer"])))
