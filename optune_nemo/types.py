"""Data exchanged between the algorithm and its components (policy, generation, reward, data).

Token sequences are plain `list[int]`, unpadded: padding is the business of whoever batches them
(the policy and the engines), so no padding convention leaks across an interface.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass(frozen=True)
class Prompt:
    """One training prompt. `token_ids` is the prompt after the chat template, ready to generate."""

    prompt_id: int
    text: str
    token_ids: tuple[int, ...]
    metadata: dict = field(default_factory=dict, compare=False, hash=False)
    """Task data the reward may use (e.g. the exact answer); JSON-serialisable."""


@dataclass
class SamplingParams:
    """How to sample. `seed` makes sampling reproducible and independent of batch composition:
    the sample `j` of the request with key `k` uses a generator seeded from (seed, k, j)."""

    n: int = 2
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 32
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0


@dataclass
class Sample:
    """One generated response."""

    token_ids: list[int]
    """Response tokens, the stop token included when one ended it."""
    text: str
    """Decoded response, special tokens skipped."""
    finish_reason: str
    """`stop` (a stop token) or `length` (max_new_tokens)."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class GenerationEngine(Protocol):
    """Turns prompts into `n` samples each. Every rank calls `generate` with the same arguments and
    gets the same full result back (engines shard over data-parallel ranks internally)."""

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 keys: Sequence[int]) -> list[list[Sample]]:
        """`keys[i]` identifies prompt i for seeding (the algorithm passes the prompt id mixed with
        the iteration), so a prompt's samples do not depend on which other prompts share its batch."""
        ...

    def begin_generation(self) -> None:
        """Before an iteration's generation: take the policy's current weights (engines that hold
        their own copy refit them here)."""
        ...

    def end_generation(self) -> None:
        """After generation, before training: release memory the policy needs."""
        ...


@dataclass
class PreferenceBatch:
    """The training set D_t as the policy consumes it: one entry per pair, aligned lists.

    `prompts[i] + chosen[i]` is the chosen sequence of pair i; log-probabilities are summed over the
    `chosen[i]` / `rejected[i]` positions only (prompt and padding masked).
    """

    prompts: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]
    ref_chosen_logps: torch.Tensor      # [P] float32, under pi_t (start of the iteration)
    ref_rejected_logps: torch.Tensor    # [P]
    chosen_rewards: torch.Tensor        # [P]
    rejected_rewards: torch.Tensor      # [P]

    def __len__(self) -> int:
        return len(self.prompts)


PairLossFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""`loss_fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
chosen_rewards, rejected_rewards) -> (per_pair_loss, margin, weight)`, all [B] tensors."""


class Policy(Protocol):
    """The trainable policy. Collective: every rank calls every method with the same arguments."""

    def sequence_logprobs(self, prompts: Sequence[Sequence[int]],
                          responses: Sequence[Sequence[int]]) -> torch.Tensor:
        """[P] float32: sum of log pi(response token | prefix) over response tokens, on every rank."""
        ...

    def train(self, batch: PreferenceBatch, loss_fn: PairLossFn, *, epochs: int,
              seed: int) -> list[dict[str, float]]:
        """Optimizer steps over `batch` (global batches of train.global_batch_size pairs, the last
        one possibly smaller). Returns one metrics dict per optimizer step (at least `loss`,
        `grad_norm`, `lr`, `implicit_reward_accuracy`, `wdpo_weight_mean`)."""
        ...

    def save_checkpoint(self, directory: str) -> None:
        """Model and optimizer state, sharded, into `directory` (collective)."""
        ...

    def load_checkpoint(self, directory: str) -> None:
        """Restore what save_checkpoint wrote (collective)."""
        ...


RewardFn = Callable[..., list[float]]
"""`fn(prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]`."""
