"""Preference files for reward-model training: rendering (checked against hand-built token lists and
transformers' own chat template), row errors (one line naming the key, the file and the row), over-long
pairs, Parquet, and the held-out split."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rm_tiny import separable_rows, write_jsonl

from optune_nemo.config import ConfigError
from optune_nemo.data import ByteTokenizer
from optune_nemo.data.preferences import (
    load_preference_pairs,
    pairs_from_rows,
    render_sequence,
    split_heldout,
)

TOK = ByteTokenizer()
S = TOK.special_ids


def _bytes(text):
    return list(text.encode())


def _load(path, **kw):
    return load_preference_pairs(path, TOK, max_length=kw.pop("max_length", 200), overlong=kw.pop("overlong",
                                                                                                   "truncate"), **kw)


def test_rendering_is_chat_template_response_end_token(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "hi", "chosen": "yes", "rejected": "no", "margin": 1.5, "id": 7},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}],
         "chosen": "a", "rejected": "b"}])
    first, second = _load(path)
    prompt = [S["<|bos|>"], S["<|user|>"], *_bytes("hi"), S["<|end|>"], S["<|assistant|>"]]
    assert first.chosen == tuple(prompt + _bytes("yes") + [S["<|end|>"]])
    assert first.rejected == tuple(prompt + _bytes("no") + [S["<|end|>"]])
    assert (first.pair_id, first.margin) == (7, 1.5)
    conv = [S["<|bos|>"], S["<|system|>"], *_bytes("be brief"), S["<|end|>"], S["<|user|>"], *_bytes("q"),
            S["<|end|>"], S["<|assistant|>"]]
    assert second.chosen == tuple(conv + _bytes("a") + [S["<|end|>"]])
    assert (second.pair_id, second.margin) == (1, 0.0)           # the row index; no margin: 0


def test_hf_rendering_matches_transformers_chat_template(tmp_path):
    from hf_tiny import tiny_tokenizer

    from optune_nemo.data.hf_tokenizer import HFTokenizer

    tiny_tokenizer().save_pretrained(tmp_path)
    tok = HFTokenizer.from_pretrained(tmp_path)
    hf = tiny_tokenizer()
    msgs = [{"role": "user", "content": "what is 2 + 3 ?"}]
    text = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) + "w7 w8"
    want = hf(text, add_special_tokens=False)["input_ids"] + [hf.eos_token_id]
    assert render_sequence(tok, msgs, "w7 w8") == want


@pytest.mark.parametrize("row, match", [
    ({"prompt": "p", "rejected": "r"}, "row 1 is missing `chosen`"),
    ({"prompt": "p", "chosen": "c"}, "row 1 is missing `rejected`"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "row 1 `chosen` and `rejected` are identical"),
    ({"prompt": "p", "chosen": 3, "rejected": "r"}, "row 1 `chosen` must be a string"),
    ({"prompt": "p", "chosen": "c", "rejected": ["r"]}, "row 1 `rejected` must be a string"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "margin": "big"}, "row 1 `margin` must be a finite number"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "margin": float("nan")}, "`margin` must be a finite number"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "margin": True}, "`margin` must be a finite number"),
    ({"prompt": 5, "chosen": "c", "rejected": "r"}, "row 1 `prompt` must be a string"),
    ({"chosen": "c", "rejected": "r"}, "row 1 must have exactly one of `prompt` or `messages`"),
    ({"prompt": "p", "messages": [{"role": "user", "content": "x"}], "chosen": "c", "rejected": "r"},
     "exactly one of `prompt` or `messages`"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "chosen": "c",
      "rejected": "r"}, "row 1 `messages` must end with a user turn"),
    ({"messages": [{"role": "robot", "content": "x"}], "chosen": "c", "rejected": "r"}, "`messages` must be"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "id": 0}, "row 1 `id` must be a unique integer"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "id": "a"}, "row 1 `id` must be a unique integer"),
])
def test_bad_rows_are_one_line_naming_the_key_file_and_row(tmp_path, row, match):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok", "chosen": "c", "rejected": "r", "id": 0}, row])
    with pytest.raises(ConfigError) as err:
        _load(path)
    msg = str(err.value)
    assert msg.startswith(f"data.path: {path} row 1") and match in msg and "\n" not in msg, msg


@pytest.mark.parametrize("content, match", [("{not json\n", "line 1 is not valid JSON"),
                                            ("[1, 2]\n", "line 1 must be a JSON object")])
def test_bad_json_lines(tmp_path, content, match):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigError, match=match) as err:
        _load(path)
    assert str(err.value).startswith("data.path:")


def test_missing_file_wrong_extension_and_other_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^data.path: file not found"):
        _load(tmp_path / "none.jsonl")
    with pytest.raises(ConfigError, match=r"^data.path: must end in .jsonl or .parquet"):
        _load(tmp_path / "p.csv")
    bad = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "p", "chosen": "c"}])
    with pytest.raises(ConfigError, match=r"^data.eval_path: .* row 0 is missing `rejected`"):
        _load(bad, key="data.eval_path")


def test_overlong_truncate_keeps_the_last_tokens_and_drop_leaves_the_pair_out(tmp_path, caplog):
    rows = [{"prompt": "short", "chosen": "a", "rejected": "b"},
            {"prompt": "a much longer prompt than the limit", "chosen": "yes!", "rejected": "no"}]
    full = pairs_from_rows(rows, TOK, max_length=1000, overlong="truncate", source="x")
    limit = 20
    assert len(full[0].chosen) <= limit < len(full[1].chosen)
    with caplog.at_level(logging.WARNING):
        cut = pairs_from_rows(rows, TOK, max_length=limit, overlong="truncate", source="x")
    assert cut[0] == full[0]
    assert cut[1].chosen == full[1].chosen[-limit:] and cut[1].rejected == full[1].rejected[-limit:]
    assert cut[1].chosen[-5:] == tuple(_bytes("yes!") + [S["<|end|>"]])      # the response stays whole
    assert "1 of 2 pairs" in caplog.text and "truncated" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        kept = pairs_from_rows(rows, TOK, max_length=limit, overlong="drop", source="x")
    assert kept == full[:1] and "1 of 2 pairs" in caplog.text and "dropped" in caplog.text
    write_jsonl(tmp_path / "long.jsonl", rows[1:])
    with pytest.raises(ConfigError, match="no usable preference pairs"):
        _load(tmp_path / "long.jsonl", max_length=limit, overlong="drop")


def test_parquet_reads_like_jsonl(tmp_path):
    rows = separable_rows(6, seed=3)
    rows[2]["margin"] = 0.25
    jsonl = write_jsonl(tmp_path / "p.jsonl", rows)
    table = pa.Table.from_pylist([{**r, "margin": r.get("margin")} for r in rows])   # nulls where absent
    pq.write_table(table, tmp_path / "p.parquet")
    assert _load(tmp_path / "p.parquet") == _load(jsonl)
    assert [p.margin for p in _load(jsonl)] == [0.0, 0.0, 0.25, 0.0, 0.0, 0.0]


def test_heldout_split_is_seeded_disjoint_and_in_file_order(tmp_path):
    pairs = pairs_from_rows(separable_rows(40, seed=1), TOK, max_length=200, overlong="truncate", source="x")
    train, held = split_heldout(pairs, 0.25, seed=5)
    assert len(held) == 10 and len(train) == 30
    assert sorted([p.pair_id for p in train] + [p.pair_id for p in held]) == list(range(40))
    assert [p.pair_id for p in held] == sorted(p.pair_id for p in held)
    assert split_heldout(pairs, 0.25, seed=5) == (train, held)
    assert split_heldout(pairs, 0.25, seed=6)[1] != held
    assert split_heldout(pairs, 0.0, seed=5) == (list(pairs), [])
    with pytest.raises(ConfigError, match="^rm.eval_fraction: 0.99 holds out all 40 pairs"):
        split_heldout(pairs, 0.99, seed=5)


def test_rows_json_round_trip_of_the_documented_example(tmp_path):
    """The example of docs/reward_models.md parses."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "reward_models.md").read_text()
    block = doc.split("```json\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "doc.jsonl"
    path.write_text(block)
    pairs = _load(path)
    assert len(pairs) == len([line for line in block.splitlines() if line.strip()]) >= 2
    assert all(json.loads(line) for line in block.splitlines() if line.strip())
