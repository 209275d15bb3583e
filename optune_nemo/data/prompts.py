"""Prompt sources: JSONL or Parquet files, or a built-in task.

File schema (one row per prompt; docs/data.md has examples):
  - `prompt` (string) or `messages` (list of {"role": system|user|assistant, "content": str}):
    exactly one of them;
  - `id` (optional int): the prompt id, unique; the row index when absent;
  - any other column is kept as metadata and handed to the reward function (e.g. `answer`).
Every prompt keeps its conversation (`Prompt.messages`: a `prompt` string is one user message), which the
rewards see whole; `Prompt.text` is its last user turn. Prompts are rendered with the tokenizer's chat
template (generation prompt appended). Longer than
`data.max_prompt_length` tokens: `truncate` keeps the last tokens (so the generation prompt stays),
`reject` drops the row; the count is logged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from optune_nemo.config import ConfigError, DataConfig
from optune_nemo.interfaces import Prompt

log = logging.getLogger(__name__)


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise ConfigError(f"data.path: file not found: {path}")
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"data.path: {path} line {n} is not valid JSON: {e}") from None
            if not isinstance(row, dict):
                raise ConfigError(f"data.path: {path} line {n} must be a JSON object")
            rows.append(row)
        return rows
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise ConfigError(f"data.path: {path} is not a readable Parquet file ({str(e).splitlines()[0]})") from None
    raise ConfigError(f"data.path: must end in .jsonl or .parquet (got {path})")


def _messages_of(row: dict, where: str) -> tuple[str, list[dict]]:
    has_prompt, has_messages = row.get("prompt") is not None, row.get("messages") is not None
    if has_prompt == has_messages:
        raise ConfigError(f"data.path: {where} must have exactly one of `prompt` or `messages`")
    if has_prompt:
        if not isinstance(row["prompt"], str):
            raise ConfigError(f"data.path: {where} `prompt` must be a string")
        return row["prompt"], [{"role": "user", "content": row["prompt"]}]
    msgs = row["messages"]
    ok = isinstance(msgs, list) and msgs and all(
        isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
        and isinstance(m.get("content"), str) for m in msgs)
    if not ok:
        raise ConfigError(f"data.path: {where} `messages` must be a non-empty list of "
                          "{role: system|user|assistant, content: string}")
    text = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), msgs[-1]["content"])
    return text, [dict(role=m["role"], content=m["content"]) for m in msgs]


def prompts_from_rows(rows: list[dict], tokenizer, *, max_length: int, overlong: str,
                      source: str) -> list[Prompt]:
    prompts, ids, cut = [], set(), 0
    for n, row in enumerate(rows):
        where = f"{source} row {n}"
        text, messages = _messages_of(row, where)
        pid = row.get("id", n)
        if not isinstance(pid, int) or pid in ids:
            raise ConfigError(f"data.path: {where} `id` must be a unique integer (got {pid!r})")
        ids.add(pid)
        token_ids = tokenizer.apply_chat_template(messages)
        if len(token_ids) > max_length:
            cut += 1
            if overlong == "reject":
                continue
            token_ids = token_ids[-max_length:]
        metadata = {k: v for k, v in row.items() if k not in ("prompt", "messages", "id")}
        prompts.append(Prompt(pid, text, tuple(token_ids), metadata, tuple(messages)))
    if cut:
        verb = "rejected" if overlong == "reject" else "truncated to their last"
        log.warning("%d of %d prompts from %s were longer than data.max_prompt_length = %d tokens: %s%s",
                    cut, len(rows), source, max_length, verb,
                    f" {max_length} tokens" if overlong == "truncate" else "")
    return prompts


def load_prompts(cfg: DataConfig, tokenizer, *, split: str = "train", seed: int = 0) -> list[Prompt]:
    """The first `data.num_prompts` prompts of the file, or of the built-in task's `split`."""
    if cfg.path is None:
        from optune_nemo.data.tasks import get_task

        rows = get_task(cfg.task).problems(cfg.num_prompts, seed=seed, split=split)
        source = f"the built-in {cfg.task} task ({split})"
    else:
        rows = _read_rows(Path(cfg.path))[: cfg.num_prompts]
        source = cfg.path
    prompts = prompts_from_rows(rows, tokenizer, max_length=cfg.max_prompt_length,
                                overlong=cfg.overlong_prompts, source=source)
    if not prompts:
        raise ConfigError(f"data.path: no usable prompts in {source}")
    log.info("%d prompts from %s", len(prompts), source)
    return prompts
