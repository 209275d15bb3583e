"""Preference pairs for reward-model training: JSONL or Parquet files (docs/reward_models.md).

Row schema:
  - `prompt` (string) or `messages` (list of {"role": system|user|assistant, "content": str} ending with a
    user turn): exactly one of them, as in prompt files (`data/prompts.py`);
  - `chosen`, `rejected` (strings, different): the assistant's preferred and dispreferred response;
  - `margin` (optional number, 0 when absent or null): the Bradley-Terry margin of the pair, the lead the
    chosen score is asked to have (`losses.bradley_terry.bradley_terry_per_pair`);
  - `id` (optional int, unique; the row index when absent). Other columns are ignored.

A sequence is rendered by `render_sequence`: the conversation through the tokenizer's chat template
(generation prompt appended), then the response's tokens, then the tokenizer's first stop token (EOS, or
the byte tokenizer's end of turn). The reward types that score with a reward model render (conversation,
response) the same way (`reward.hf.RenderedReward`: `render_sequence` of the prompt's whole conversation,
`Prompt.conversation()`, built by `data/prompts.py` from the same `prompt` / `messages` columns), so a model
is trained and used on identical token sequences.

Sequences longer than `max_length` tokens: `truncate` keeps the last `max_length` tokens of the sequence
(the response and its end token stay whole unless the response alone is longer; the conversation is cut
from the left); `drop` leaves the whole pair out. Either way they are counted and logged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from optune_nemo.config import ConfigError
from optune_nemo.runtime.seeding import generator

log = logging.getLogger(__name__)

OVERLONG = ("truncate", "drop")


@dataclass(frozen=True)
class ComparisonPair:
    """One rendered pair: whole token sequences (conversation, response, end token)."""

    pair_id: int
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]
    margin: float = 0.0


def response_end_id(tokenizer) -> int:
    """The token appended to every response: the tokenizer's first stop token."""
    return int(tokenizer.stop_token_ids[0])


def render_sequence(tokenizer, messages: list[dict], response: str) -> list[int]:
    """The conversation (chat template, generation prompt appended), the response, the end token."""
    return [*tokenizer.apply_chat_template(messages), *tokenizer.encode(response), response_end_id(tokenizer)]


def _rekey(e: ConfigError, key: str) -> ConfigError:
    """`data/prompts.py`'s row errors name `data.path`; the same errors about another file name its key."""
    text = str(e)
    return ConfigError(key + text[len("data.path"):] if text.startswith("data.path") else text)


def read_rows(path: str | Path, *, key: str) -> list[dict]:
    """The rows of a JSONL or Parquet file (errors name `key`)."""
    from optune_nemo.data.prompts import _read_rows

    path = Path(path).expanduser()
    if path.suffix not in (".jsonl", ".parquet"):
        raise ConfigError(f"{key}: must end in .jsonl or .parquet (got {str(path)!r})")
    try:
        return _read_rows(path)
    except ConfigError as e:
        raise _rekey(e, key) from None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _checked_row(row: dict, where: str, key: str) -> tuple[list[dict], str, str, float]:
    """(messages, chosen, rejected, margin) of a row; ConfigError naming `key`, the file and the row."""
    from optune_nemo.data.prompts import _messages_of

    try:
        _, messages = _messages_of(row, where)
    except ConfigError as e:
        raise _rekey(e, key) from None
    if messages[-1]["role"] != "user":
        raise ConfigError(f"{key}: {where} `messages` must end with a user turn (the responses answer it)")
    responses = []
    for name in ("chosen", "rejected"):
        value = row.get(name)
        if value is None:
            raise ConfigError(f"{key}: {where} is missing `{name}` (each row needs `prompt` or `messages`, "
                              "`chosen` and `rejected`)")
        if not isinstance(value, str):
            raise ConfigError(f"{key}: {where} `{name}` must be a string (got {type(value).__name__})")
        responses.append(value)
    if responses[0] == responses[1]:
        raise ConfigError(f"{key}: {where} `chosen` and `rejected` are identical (a pair must differ)")
    margin = row.get("margin")
    if margin is None:
        margin = 0.0
    elif not (_number(margin) and math.isfinite(margin)):
        raise ConfigError(f"{key}: {where} `margin` must be a finite number (got {margin!r})")
    return messages, responses[0], responses[1], float(margin)


def pairs_from_rows(rows: Sequence[dict], tokenizer, *, max_length: int, overlong: str, source: str,
                    key: str = "data.path") -> list[ComparisonPair]:
    """Rendered pairs of `rows` (module docstring); errors name `key`, `source` and the row."""
    if overlong not in OVERLONG:
        raise ConfigError(f"rm.overlong: must be one of {', '.join(OVERLONG)} (got {overlong!r})")
    pairs, ids, long = [], set(), 0
    for n, row in enumerate(rows):
        where = f"{source} row {n}"
        messages, chosen, rejected, margin = _checked_row(row, where, key)
        pid = row.get("id")
        pid = n if pid is None else pid
        if not isinstance(pid, int) or isinstance(pid, bool) or pid in ids:
            raise ConfigError(f"{key}: {where} `id` must be a unique integer (got {pid!r})")
        ids.add(pid)
        seqs = [render_sequence(tokenizer, messages, r) for r in (chosen, rejected)]
        if max(len(s) for s in seqs) > max_length:
            long += 1
            if overlong == "drop":
                continue
            seqs = [s[-max_length:] for s in seqs]
        pairs.append(ComparisonPair(pid, tuple(seqs[0]), tuple(seqs[1]), margin))
    if long:
        what = "dropped" if overlong == "drop" else f"truncated to their last {max_length} tokens"
        log.warning("%d of %d pairs from %s had a sequence longer than model.seq_length = %d tokens: %s",
                    long, len(rows), source, max_length, what)
    return pairs


def load_preference_pairs(path: str | Path, tokenizer, *, max_length: int, overlong: str,
                          key: str = "data.path") -> list[ComparisonPair]:
    """Every usable pair of a preference file. Raises ConfigError (naming `key`) for a bad file or row, and
    when no pair is left."""
    rows = read_rows(path, key=key)
    pairs = pairs_from_rows(rows, tokenizer, max_length=max_length, overlong=overlong, source=str(path), key=key)
    if not pairs:
        raise ConfigError(f"{key}: no usable preference pairs in {path} ({len(rows)} rows; rm.overlong={overlong}, "
                          f"model.seq_length={max_length})")
    log.info("%d preference pairs from %s", len(pairs), path)
    return pairs


def split_heldout(pairs: Sequence[ComparisonPair], fraction: float, *,
                  seed: int) -> tuple[list[ComparisonPair], list[ComparisonPair]]:
    """(training, held-out): round(fraction * N) pairs drawn with a generator seeded by (seed, "rm_heldout"),
    both in file order. Raises ConfigError when nothing would be left to train on."""
    import torch

    n = len(pairs)
    k = int(round(fraction * n))
    if k >= n:
        raise ConfigError(f"rm.eval_fraction: {fraction} holds out all {n} pairs; lower it or set data.eval_path")
    held = set(torch.randperm(n, generator=generator(seed, "rm_heldout"))[:k].tolist())
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]
