"""The rollout store: for every prompt exactly one pair (y_a, y_b) with its rewards (docs/algorithm.md), and
the rewards and lengths of all `generation.num_samples` samples the pair was picked from.

Persisted as `rollouts.parquet` inside each checkpoint, one row per prompt (schema version 2, in the
Parquet schema's metadata under `optune_nemo.rollouts_version`):

| column | type | meaning |
|---|---|---|
| prompt_id | int64 | the prompt's id |
| prompt | string | prompt text: its last user turn (before the chat template) |
| prompt_token_ids | list<int64> | prompt tokens after the chat template |
| response_a, response_b | string | decoded responses |
| response_a_token_ids, response_b_token_ids | list<int64> | response tokens |
| finish_reason_a, finish_reason_b | string | `stop` or `length` |
| reward_a, reward_b | float64 | rewards |
| generated_at_iteration | int64 | iteration that sampled this pair (-1: none yet) |
| metadata | string | the prompt's metadata as JSON |
| rewards | list<float64> | (v2) the rewards of all n samples, in sample order |
| response_num_tokens | list<int64> | (v2) the token counts of all n samples, in sample order |
| messages | string | (v2) the prompt's conversation as JSON (`[]`: its text alone) |

The pair of n samples (`pair_indices`) is the highest- and the lowest-reward sample, response_a the one
with the smaller sample index; so for n = 2 response_a is sample 0 and response_b sample 1, as in
version 1. The chosen response is the one with the higher reward; on an exact tie, response_a. A version-1
file (no version, the first 13 columns) loads as n = 2: rewards (reward_a, reward_b), the token counts of
the two responses, no conversation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from optune_nemo.interfaces import Prompt, Sample
from optune_nemo.runtime.distributed import global_rank
from optune_nemo.runtime.fileio import atomic_file

SCHEMA_VERSION = 2
"""Version of the Parquet layout written (module docstring); 1 is the layout before it had a version."""
VERSION_KEY = b"optune_nemo.rollouts_version"


def pair_indices(rewards: Sequence[float]) -> tuple[int, int]:
    """(a, b), a < b: the sample indices of the pair kept from n >= 2 scored samples: the highest reward
    (the earliest sample among equal highest) and the lowest (the latest among equal lowest). When all n
    rewards are equal this is (0, n - 1), a tie; for n = 2 it is always (0, 1)."""
    n = len(rewards)
    if n < 2:
        raise ValueError(f"a pair needs at least 2 samples (got {n})")
    hi = max(range(n), key=lambda i: (rewards[i], -i))
    lo = min(range(n), key=lambda i: (rewards[i], -i))
    return (hi, lo) if hi < lo else (lo, hi)


@dataclass
class PairRecord:
    """A prompt's slot in the store: its pair as sampled (response_a / response_b in sample order, not yet
    oriented into chosen and rejected: `PreferencePair` is that), or no pair before its first sampling."""

    prompt: Prompt
    response_a: Sample | None = None
    response_b: Sample | None = None
    reward_a: float = float("nan")
    reward_b: float = float("nan")
    generated_at_iteration: int = -1
    rewards: tuple[float, ...] = ()
    """The rewards of every sample the pair was picked from, in sample order (empty without a pair)."""
    num_tokens: tuple[int, ...] = ()
    """Their response lengths in tokens, in the same order."""

    @property
    def num_samples(self) -> int:
        return len(self.rewards)

    @property
    def has_pair(self) -> bool:
        return self.response_a is not None

    @property
    def ranking_score(self) -> float:
        """max(r_a, r_b): the reward of the chosen response."""
        return max(self.reward_a, self.reward_b)


@dataclass(frozen=True)
class PreferencePair:
    """A pair oriented for the loss: chosen = higher reward."""

    prompt_id: int
    prompt_token_ids: tuple[int, ...]
    chosen_token_ids: tuple[int, ...]
    rejected_token_ids: tuple[int, ...]
    chosen_reward: float
    rejected_reward: float


class RolloutStore:
    """Stateful: `state_dict()` / `load_state_dict()`; `to_parquet()` / `from_parquet()`."""

    def __init__(self, prompts: list[Prompt]):
        self._records = {p.prompt_id: PairRecord(p) for p in prompts}
        if len(self._records) != len(prompts):
            raise ValueError("prompt ids must be unique")

    # ------------------------------------------------------------------ access

    def prompt_ids(self) -> list[int]:
        return sorted(self._records)

    def pair(self, prompt_id: int) -> PairRecord:
        return self._records[prompt_id]

    def set_pair(self, prompt_id: int, sample_a: Sample, sample_b: Sample, reward_a: float,
                 reward_b: float, iteration: int, *, rewards: Sequence[float] | None = None,
                 num_tokens: Sequence[int] | None = None) -> None:
        """Replace a prompt's pair. `rewards` / `num_tokens`: of every sample it was picked from (default:
        the two of the pair)."""
        rec = self._records[prompt_id]
        rec.response_a, rec.response_b = sample_a, sample_b
        rec.reward_a, rec.reward_b = float(reward_a), float(reward_b)
        rec.generated_at_iteration = iteration
        rec.rewards = tuple(float(r) for r in (rewards if rewards is not None else (reward_a, reward_b)))
        rec.num_tokens = tuple(int(k) for k in (num_tokens if num_tokens is not None
                                                 else (sample_a.num_tokens, sample_b.num_tokens)))
        if len(rec.rewards) != len(rec.num_tokens) or len(rec.rewards) < 2:
            raise ValueError(f"prompt {prompt_id}: {len(rec.rewards)} rewards and {len(rec.num_tokens)} token "
                             "counts (one each per sample, at least 2)")

    def set_samples(self, prompt_id: int, samples: Sequence[Sample], rewards: Sequence[float],
                    iteration: int) -> tuple[int, int]:
        """Keep the pair of n scored samples (`pair_indices`) and all n rewards and lengths; returns the
        sample indices (a, b) kept."""
        if len(samples) != len(rewards):
            raise ValueError(f"prompt {prompt_id}: {len(samples)} samples but {len(rewards)} rewards")
        a, b = pair_indices(rewards)
        self.set_pair(prompt_id, samples[a], samples[b], rewards[a], rewards[b], iteration,
                      rewards=rewards, num_tokens=[s.num_tokens for s in samples])
        return a, b

    def ranking_scores(self) -> dict[int, float]:
        """{prompt_id: max(r_a, r_b)} over prompts that have a pair."""
        return {pid: r.ranking_score for pid, r in sorted(self._records.items()) if r.has_pair}

    def preference_pairs(self, min_reward_gap: float = 0.0) -> tuple[list[PreferencePair], int]:
        """Pairs for the loss (prompt-id order) and the number of ties left out
        (|r_a - r_b| <= min_reward_gap: no preference; they stay in the store and the ranking)."""
        pairs, ties = [], 0
        for pid, r in sorted(self._records.items()):
            if not r.has_pair:
                continue
            if abs(r.reward_a - r.reward_b) <= min_reward_gap:
                ties += 1
                continue
            a_wins = r.reward_a >= r.reward_b
            w, lo = (r.response_a, r.response_b) if a_wins else (r.response_b, r.response_a)
            pairs.append(PreferencePair(
                pid, tuple(r.prompt.token_ids), tuple(w.token_ids), tuple(lo.token_ids),
                max(r.reward_a, r.reward_b), min(r.reward_a, r.reward_b)))
        return pairs, ties

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, list]:
        """Column lists (the parquet layout)."""
        cols: dict[str, list] = {k: [] for k in _COLUMNS}
        for pid, r in sorted(self._records.items()):
            a, b = r.response_a, r.response_b
            row = {
                "prompt_id": pid, "prompt": r.prompt.text, "prompt_token_ids": list(r.prompt.token_ids),
                "response_a": a.text if a else None, "response_b": b.text if b else None,
                "response_a_token_ids": list(a.token_ids) if a else None,
                "response_b_token_ids": list(b.token_ids) if b else None,
                "finish_reason_a": a.finish_reason if a else None,
                "finish_reason_b": b.finish_reason if b else None,
                # null (not NaN) for a prompt without a pair yet, so states compare equal
                "reward_a": r.reward_a if a else None, "reward_b": r.reward_b if b else None,
                "generated_at_iteration": r.generated_at_iteration,
                "metadata": json.dumps(r.prompt.metadata, sort_keys=True),
                "rewards": list(r.rewards) if a else None,
                "response_num_tokens": list(r.num_tokens) if a else None,
                "messages": json.dumps(list(r.prompt.messages)),
            }
            for k in _COLUMNS:
                cols[k].append(row[k])
        return cols

    def load_state_dict(self, state: dict[str, list]) -> None:
        """Column lists of version 2, or of version 1 (without the v2 columns: module docstring)."""
        n_rows = len(state["prompt_id"])
        v2 = {k: state.get(k, [None] * n_rows) for k in _V2_COLUMNS}
        records = {}
        for i, pid in enumerate(state["prompt_id"]):
            messages = tuple(json.loads(v2["messages"][i])) if v2["messages"][i] is not None else ()
            prompt = Prompt(int(pid), state["prompt"][i], tuple(int(t) for t in state["prompt_token_ids"][i]),
                            json.loads(state["metadata"][i]), messages)
            ra, rb = state["reward_a"][i], state["reward_b"][i]
            rec = PairRecord(prompt, reward_a=float("nan") if ra is None else float(ra),
                             reward_b=float("nan") if rb is None else float(rb),
                             generated_at_iteration=int(state["generated_at_iteration"][i]))
            if state["response_a"][i] is not None:
                rec.response_a = Sample(list(state["response_a_token_ids"][i]), state["response_a"][i],
                                        state["finish_reason_a"][i])
                rec.response_b = Sample(list(state["response_b_token_ids"][i]), state["response_b"][i],
                                        state["finish_reason_b"][i])
                rewards, lengths = v2["rewards"][i], v2["response_num_tokens"][i]
                rec.rewards = tuple(float(r) for r in rewards) if rewards is not None else (rec.reward_a, rec.reward_b)
                rec.num_tokens = (tuple(int(k) for k in lengths) if lengths is not None
                                  else (rec.response_a.num_tokens, rec.response_b.num_tokens))
            records[prompt.prompt_id] = rec
        self._records = records

    def to_parquet(self, path: str | Path) -> None:
        """Atomic: a temporary file renamed into place."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        with atomic_file(path) as tmp:
            pq.write_table(pa.table(self.state_dict(), schema=_schema()), tmp)

    # checkpoint part: rank 0 writes, every rank reads
    FILE = "rollouts.parquet"

    def save(self, directory: Path) -> None:
        if global_rank() == 0:
            self.to_parquet(Path(directory) / self.FILE)

    def load(self, directory: Path) -> None:
        self.load_state_dict(RolloutStore.from_parquet(Path(directory) / self.FILE).state_dict())

    @classmethod
    def from_parquet(cls, path: str | Path) -> RolloutStore:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        version = int((table.schema.metadata or {}).get(VERSION_KEY, b"1"))
        if version > SCHEMA_VERSION:
            raise ValueError(f"{path}: rollout store version {version} is newer than this optune_nemo reads "
                             f"({SCHEMA_VERSION})")
        store = cls([])
        store.load_state_dict(table.to_pydict())
        return store

    def __eq__(self, other) -> bool:
        return isinstance(other, RolloutStore) and self.state_dict() == other.state_dict()

    def __len__(self) -> int:
        return len(self._records)


_V2_COLUMNS = ("rewards", "response_num_tokens", "messages")
_COLUMNS = ("prompt_id", "prompt", "prompt_token_ids", "response_a", "response_b",
            "response_a_token_ids", "response_b_token_ids", "finish_reason_a", "finish_reason_b",
            "reward_a", "reward_b", "generated_at_iteration", "metadata", *_V2_COLUMNS)


def _schema():
    import pyarrow as pa

    ids = pa.list_(pa.int64())
    types = {"prompt_id": pa.int64(), "prompt": pa.string(), "prompt_token_ids": ids,
             "response_a": pa.string(), "response_b": pa.string(), "response_a_token_ids": ids,
             "response_b_token_ids": ids, "finish_reason_a": pa.string(), "finish_reason_b": pa.string(),
             "reward_a": pa.float64(), "reward_b": pa.float64(), "generated_at_iteration": pa.int64(),
             "metadata": pa.string(), "rewards": pa.list_(pa.float64()), "response_num_tokens": ids,
             "messages": pa.string()}
    return pa.schema([(k, types[k]) for k in _COLUMNS], metadata={VERSION_KEY: str(SCHEMA_VERSION).encode()})
