"""The seams of the system: data exchanged between the algorithm and its components, the protocols the
components implement (policy, generation engine, reward), and how a trainer's run ends (`Outcome`). Losses
have their own protocol in `optune_nemo.losses`.

Token sequences are plain `list[int]`, unpadded: padding is the business of whoever batches them
(the policy and the engines), so no padding convention leaks across an interface.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from optune_nemo.losses import PairLoss

import torch


class Outcome(Enum):
    """How a trainer's `fit` ended; `OPTune.iteration` also returns `PREEMPTED` when it stopped early."""

    COMPLETED = "completed"
    """Every iteration (optimizer step, for train_rm) done: the run is finished."""
    PREEMPTED = "preempted"
    """Stopped cleanly at a pre-emption request; the same command resumes from the last checkpoint."""


@dataclass(frozen=True)
class Prompt:
    """One training prompt. `token_ids` is the prompt after the chat template, ready to generate; `text` is
    its last user turn (what a judge calls the question); `messages` the whole conversation it renders."""

    prompt_id: int
    text: str
    token_ids: tuple[int, ...]
    metadata: dict = field(default_factory=dict, compare=False, hash=False)
    """Task data the reward may use (e.g. the exact answer); JSON-serialisable."""
    messages: tuple[dict, ...] = field(default=(), hash=False)
    """The conversation the response answers: {"role": system|user|assistant, "content": str} dicts, as
    the prompt file gave them (a `prompt` string or the built-in task: one user message). Empty for a
    prompt built from its text alone (a store written before conversations were kept, a `text`-only remote
    request): `conversation()` is then the single user turn `text`."""

    def conversation(self) -> list[dict]:
        """The messages a reward renders with its own chat template (fresh dicts: callers may not alter
        the prompt's)."""
        if self.messages:
            return [{"role": m["role"], "content": m["content"]} for m in self.messages]
        return [{"role": "user", "content": self.text}]




@dataclass(frozen=True)
class SamplingParams:
    """How to sample. `n` and `max_new_tokens` have no default (the run's values come from the
    `generation.*` config); temperature 1, top_p 1 and top_k 0 are the neutral values (the model's
    own distribution, unfiltered), not defaults of a run. `seed` makes sampling reproducible and
    independent of batch composition: sample `j` of the request with key `k` uses a generator seeded
    from (seed, k, j)."""

    n: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
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


class Policy(Protocol):
    """The trainable policy, as its callers use it (the loop, the entry points, the engines). Collective:
    every rank calls every method with the same arguments."""

    def pair_logprobs(self, prompts: Sequence[Sequence[int]], chosen: Sequence[Sequence[int]],
                      rejected: Sequence[Sequence[int]], *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) summed response log-probs [P] float32 each, on every rank, computed with the
        batching `train(..., seed=seed)` uses in its first epoch: the reference log-probs of an iteration
        then equal the policy's own at its first step, whatever the precision."""
        ...

    def train(self, batch: PreferenceBatch, loss: PairLoss, *, epochs: int,
              seed: int) -> list[dict[str, float]]:
        """Optimizer steps over `batch` (global batches of train.global_batch_size pairs, the last
        one possibly smaller). Returns one dict per optimizer step: `loss`, `grad_norm`, `lr`,
        `num_pairs` and the mean over the step's pairs of every metric the loss reports."""
        ...

    def inference_model(self):
        """The KV-cached incremental forward the torch engine generates with (`generation.torch_engine`), on
        the training weights themselves: no copy, so it always samples from the current policy."""
        ...

    def materialise_optimizer_state(self) -> None:
        """Allocate the optimizer's state now (what its first step would create; training is unchanged), so
        that free memory measured from here on (an engine sizing its KV cache) already counts it."""
        ...

    def load_hf_weights(self, hf_dir: Path) -> None:
        """Copy a Hugging Face model's weights (the source of `policy.hf_path`) into the policy, each rank its
        own slices; the optimizer's main parameters follow."""
        ...

    def hf_weights(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """The weights under Hugging Face names (`model.layers.0.self_attn.q_proj.weight`, ...), each
        tensor whole (gathered over tensor-parallel ranks), on the policy's device. Collective: the
        first tensor-parallel rank of data-parallel rank 0 in every pipeline stage yields its stage's
        tensors; every other rank takes part in the gathers and yields nothing."""
        ...

    def export_hf(self, out_dir: str | Path, *, tokenizer) -> Path | None:
        """The policy as a Hugging Face directory (config, safetensors, tokenizer), written atomically
        by global rank 0, which returns its path; None elsewhere. Collective."""
        ...

    def save_checkpoint(self, directory: str) -> None:
        """Model and optimizer state, sharded, into `directory` (collective)."""
        ...

    def load_checkpoint(self, directory: str, *, load_optimizer: bool = True) -> None:
        """Restore what save_checkpoint wrote (collective); `load_optimizer=False` takes the weights only."""
        ...


RewardFn = Callable[[list[str], list[str], list[dict]], list[float]]
"""A rule-based reward: `fn(prompts, responses, metadata) -> rewards`, one float per response, where
`prompts[i]` is the last user turn and `metadata[i]` prompt i's metadata dict (e.g. the task's exact
answer). A function with a parameter named `messages` also gets `messages=` (per response the whole
conversation it answers, a list of {role, content} dicts: `Prompt.conversation()`); three-argument
functions are called as they are. Keyword arguments given in the `reward.function` config node are bound
before the call."""


class Reward(Protocol):
    """Scores (prompt, response) pairs. Collective: every rank calls `score` with the same arguments
    and gets the same list back; implementations shard the work over data-parallel ranks. Any failure
    on any rank is raised on every rank with the same message."""

    def prepare(self) -> None:
        """Before a scoring phase: take the devices (load a reward model's weights, open a connection)."""
        ...

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        """One finite float per (prompt, response), in order."""
        ...

    def release(self) -> None:
        """After a scoring phase: give the devices back before the policy trains."""
        ...
