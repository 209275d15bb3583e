"""Built-in tasks (`data.task`): prompts with a verifiable answer, a gold reward and an exactness check.

Each task is one module of this package that registers its `Task` in `TASKS` (the registry imports every
module here on its first look-up).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from optune_nemo.config import DataConfig
from optune_nemo.registry import Registry


@dataclass(frozen=True)
class Task:
    name: str
    problems: Callable[..., list[dict]]
    """problems(n, *, seed, split) -> rows {prompt, answer, ...} of the `train` or `heldout` split."""
    gold_reward: str
    """Import path of the task's rule reward (`reward.function._target_` form): the gold standard."""
    is_correct: Callable[[str, dict], bool]
    """is_correct(response, metadata): the answer is exactly right."""


TASKS: Registry[Task] = Registry("data.task", "optune_nemo.data.tasks")


def get_task(name: str) -> Task:
    """The task `data.task` names; ConfigError naming data.task and the tasks otherwise."""
    return TASKS.get(name)


def check(cfg: DataConfig) -> None:
    """The family's check of the `data` section: `data.task` is a registered task (checked even when
    data.path replaces it, as always)."""
    TASKS.check(cfg.task)
