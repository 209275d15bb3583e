"""Built-in task: natural arithmetic questions with an exact integer answer.

Deterministic for a seed; train and held-out splits are disjoint by construction (a question's
split is a function of its operands and operator, not of the draw order).
"""

from __future__ import annotations

import hashlib
import random

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
