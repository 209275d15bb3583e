"""Built-in tasks (`data.task`): prompts with a verifiable answer, a gold reward and an exactness check."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str
    problems: Callable[..., list[dict]]
    """problems(n, *, seed, split) -> rows {prompt, answer, ...} of the `train` or `heldout` split."""
    gold_reward: str
    """Import path of the task's rule reward (`reward.function._target_` form): the gold standard."""
    is_correct: Callable[[str, dict], bool]
    """is_correct(response, metadata): the answer is exactly right."""


def get_task(name: str) -> Task:
    if name == "arithmetic":
        from optune_nemo.data.tasks.arithmetic import arithmetic_problems
        from optune_nemo.reward.rules import is_exact

        return Task("arithmetic", arithmetic_problems, "optune_nemo.reward.rules.arithmetic_reward",
                    lambda response, meta: is_exact(response, meta["answer"]))
    raise ValueError(f"data.task: unknown task {name!r}")


TASKS = ("arithmetic",)
