"""Rule-based rewards: plain functions `fn(prompts, responses, metadata, **kwargs) -> list[float]`.

The built-in arithmetic task's gold reward lives with its task (optune_nemo/data/tasks/arithmetic.py) and is
re-exported here, so `reward.function._target_=optune_nemo.reward.rules.arithmetic_reward` (the default)
names it.
"""

from __future__ import annotations

from optune_nemo.data.tasks.arithmetic import arithmetic_reward, arithmetic_score, is_exact

__all__ = ["arithmetic_reward", "arithmetic_score", "is_exact", "length_reward"]


def length_reward(prompts: list[str], responses: list[str], metadata: list[dict], *,
                  target_chars: int = 32) -> list[float]:
    """-|len(response) - target| / target: a task-free example of a rule-based reward."""
    return [-abs(len(r) - target_chars) / target_chars for r in responses]
