"""Prompt loading, the byte tokenizer and the built-in arithmetic task."""

import json
import logging
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from optune_nemo.config import ConfigError, DataConfig
from optune_nemo.data import ByteTokenizer, load_prompts
from optune_nemo.data.prompts import prompts_from_rows
from optune_nemo.data.tasks.arithmetic import arithmetic_problems
from optune_nemo.data.tokenizer import SPECIALS

TOK = ByteTokenizer()
SP = {name: 256 + i for i, name in enumerate(SPECIALS)}


def _cfg(path, num_prompts=100, max_prompt_length=512, overlong="truncate"):
    return DataConfig(path=None if path is None else str(path), num_prompts=num_prompts,
                      max_prompt_length=max_prompt_length, overlong_prompts=overlong)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _template(messages):
    # independent rendering of the documented chat template
    out = [SP["<|bos|>"]]
    for m in messages:
        out += [SP[f"<|{m['role']}|>"], *m["content"].encode("utf-8"), SP["<|end|>"]]
    return out + [SP["<|assistant|>"]]


# --------------------------------------------------------------------------- tokenizer

@pytest.mark.parametrize("text", ["", "hello", "naïve café ✓ 中文 🙂", "a\nb\tc\x00", "ß" * 50])
def test_byte_tokenizer_round_trip(text):
    ids = TOK.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert TOK.decode(ids) == text


def test_byte_tokenizer_specials():
    assert TOK.vocab_size == 256 + len(SPECIALS)
    assert TOK.pad_token_id == SP["<|pad|>"] and TOK.eos_token_id == SP["<|eos|>"]
    assert set(TOK.stop_token_ids) == {SP["<|end|>"], SP["<|eos|>"]}
    ids = [*TOK.encode("hi"), SP["<|end|>"], SP["<|eos|>"]]
    assert TOK.decode(ids) == "hi"
    assert TOK.decode(ids, skip_special_tokens=False) == "hi<|end|><|eos|>"


def test_chat_template_structure():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2? é"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}]
    ids = TOK.apply_chat_template(msgs)
    assert ids == _template(msgs)
    assert ids[0] == SP["<|bos|>"] and ids[-1] == SP["<|assistant|>"]
    assert ids.count(SP["<|end|>"]) == 4
    assert TOK.decode(ids, skip_special_tokens=False) == (
        "<|bos|><|system|>Be brief.<|end|><|user|>2+2? é<|end|><|assistant|>4<|end|>"
        "<|user|>and 3+3?<|end|><|assistant|>")
    with pytest.raises(ValueError, match="role"):
        TOK.apply_chat_template([{"role": "tool", "content": "x"}])


def test_tokenizer_save(tmp_path):
    TOK.save(tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / "byte_tokenizer.json").read_text())["specials"] == list(SPECIALS)


# --------------------------------------------------------------------------- loading files

def test_load_jsonl(tmp_path):
    rows = [{"prompt": "What is 2 + 2?", "answer": 4},
            {"prompt": "Ünïcode ✓", "answer": 7, "extra": {"k": [1, 2]}},
            {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "hello"}],
             "answer": 1}]
    path = _jsonl(tmp_path / "p.jsonl", rows)
    prompts = load_prompts(_cfg(path), TOK)
    assert [p.prompt_id for p in prompts] == [0, 1, 2]
    assert prompts[0].text == "What is 2 + 2?"
    assert list(prompts[0].token_ids) == _template([{"role": "user", "content": "What is 2 + 2?"}])
    assert prompts[1].metadata == {"answer": 7, "extra": {"k": [1, 2]}}
    assert prompts[2].text == "hello"
    assert list(prompts[2].token_ids) == _template(rows[2]["messages"])
    assert prompts[2].metadata == {"answer": 1}
    assert isinstance(prompts[0].token_ids, tuple)


def test_load_jsonl_skips_blank_lines_and_limits_num_prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n   \n{"prompt": "b"}\n{"prompt": "c"}\n')
    prompts = load_prompts(_cfg(path), TOK)
    assert [p.text for p in prompts] == ["a", "b", "c"]
    prompts = load_prompts(_cfg(path, num_prompts=2), TOK)
    assert [p.text for p in prompts] == ["a", "b"]


def test_load_parquet(tmp_path):
    rows = [{"id": 10, "prompt": "first", "answer": 3}, {"id": 20, "prompt": "second ✓", "answer": -5}]
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    prompts = load_prompts(_cfg(path), TOK)
    assert [p.prompt_id for p in prompts] == [10, 20]
    assert [p.text for p in prompts] == ["first", "second ✓"]
    assert [p.metadata for p in prompts] == [{"answer": 3}, {"answer": -5}]
    assert list(prompts[1].token_ids) == _template([{"role": "user", "content": "second ✓"}])


def test_load_parquet_messages(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "q1"}]},
            {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}]
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    prompts = load_prompts(_cfg(path), TOK)
    assert [p.text for p in prompts] == ["q1", "q2"]
    assert list(prompts[1].token_ids) == _template(rows[1]["messages"])


def test_id_column_used(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"id": 7, "prompt": "a"}, {"id": 3, "prompt": "b"}])
    prompts = load_prompts(_cfg(path), TOK)
    assert [(p.prompt_id, p.text) for p in prompts] == [(7, "a"), (3, "b")]
    assert all("id" not in p.metadata for p in prompts)


def test_messages_text_is_last_user_message():
    rows = [{"messages": [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
                          {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]},
            {"messages": [{"role": "system", "content": "only system"}]}]
    prompts = prompts_from_rows(rows, TOK, max_length=512, overlong="truncate", source="x")
    assert prompts[0].text == "u2"
    assert prompts[1].text == "only system"


# --------------------------------------------------------------------------- overlong prompts

def test_truncate_keeps_last_tokens_and_logs(tmp_path, caplog):
    rows = [{"prompt": "x" * 40}, {"prompt": "short"}, {"prompt": "y" * 30 + "END"}]
    path = _jsonl(tmp_path / "p.jsonl", rows)
    max_len = 20
    with caplog.at_level(logging.WARNING, logger="optune_nemo.data.prompts"):
        prompts = load_prompts(_cfg(path, max_prompt_length=max_len, overlong="truncate"), TOK)
    assert len(prompts) == 3
    for p, r in zip(prompts, rows, strict=True):
        full = _template([{"role": "user", "content": r["prompt"]}])
        assert list(p.token_ids) == full[-max_len:]
        assert len(p.token_ids) == min(len(full), max_len)
    assert prompts[2].token_ids[-1] == SP["<|assistant|>"]  # the generation prompt survives
    assert prompts[2].text == rows[2]["prompt"]  # text is not truncated
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(re.search(r"\b2 of 3 prompts\b", m) for m in warnings), warnings


def test_reject_drops_rows_and_logs(tmp_path, caplog):
    rows = [{"prompt": "x" * 40}, {"prompt": "ok", "answer": 1}, {"prompt": "z" * 40}, {"prompt": "ok2"}]
    path = _jsonl(tmp_path / "p.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="optune_nemo.data.prompts"):
        prompts = load_prompts(_cfg(path, max_prompt_length=12, overlong="reject"), TOK)
    assert [(p.prompt_id, p.text) for p in prompts] == [(1, "ok"), (3, "ok2")]
    assert prompts[0].metadata == {"answer": 1}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(re.search(r"\b2 of 4 prompts\b", m) and "reject" in m for m in warnings), warnings


def test_exact_length_is_not_overlong(caplog):
    n = len(_template([{"role": "user", "content": "abc"}]))
    with caplog.at_level(logging.WARNING, logger="optune_nemo.data.prompts"):
        prompts = prompts_from_rows([{"prompt": "abc"}], TOK, max_length=n, overlong="reject", source="s")
    assert len(prompts) == 1 and len(prompts[0].token_ids) == n
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_all_rejected_is_an_error(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "x" * 40}])
    with pytest.raises(ConfigError, match="data.path"):
        load_prompts(_cfg(path, max_prompt_length=5, overlong="reject"), TOK)


# --------------------------------------------------------------------------- errors

def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.path.*not found"):
        load_prompts(_cfg(tmp_path / "nope.jsonl"), TOK)


def test_bad_extension(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt\nhello\n")
    with pytest.raises(ConfigError, match=r"data\.path.*\.jsonl or \.parquet"):
        load_prompts(_cfg(path), TOK)


@pytest.mark.parametrize("bad_row", [
    {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},  # both
    {"answer": 3},  # neither
    {"prompt": None, "messages": None},  # neither (nulls)
])
def test_prompt_xor_messages(tmp_path, bad_row):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, bad_row])
    with pytest.raises(ConfigError) as e:
        load_prompts(_cfg(path), TOK)
    msg = str(e.value)
    assert "data.path" in msg and "row 1" in msg and "exactly one" in msg


@pytest.mark.parametrize("bad_messages", [
    [],
    "just a string",
    [{"role": "user"}],
    [{"role": "robot", "content": "x"}],
    [{"role": "user", "content": 5}],
    ["user: hi"],
])
def test_bad_messages(tmp_path, bad_messages):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"prompt": "ok"}, {"messages": bad_messages}])
    with pytest.raises(ConfigError) as e:
        load_prompts(_cfg(path), TOK)
    msg = str(e.value)
    assert "data.path" in msg and "row 2" in msg and "messages" in msg


def test_prompt_not_a_string(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": 42}])
    with pytest.raises(ConfigError, match=r"data\.path.*row 0.*string"):
        load_prompts(_cfg(path), TOK)


def test_duplicate_ids(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"id": 1, "prompt": "a"}, {"id": 2, "prompt": "b"},
                                         {"id": 1, "prompt": "c"}])
    with pytest.raises(ConfigError) as e:
        load_prompts(_cfg(path), TOK)
    msg = str(e.value)
    assert "data.path" in msg and "row 2" in msg and "id" in msg


def test_implicit_id_collides_with_explicit_id(tmp_path):
    # row 0 has no id (-> 0), row 1 claims id 0
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"id": 0, "prompt": "b"}])
    with pytest.raises(ConfigError, match=r"data\.path.*row 1"):
        load_prompts(_cfg(path), TOK)


@pytest.mark.parametrize("bad_id", ["3", 1.5, None])
def test_non_integer_id(tmp_path, bad_id):
    path = _jsonl(tmp_path / "p.jsonl", [{"id": bad_id, "prompt": "a"}])
    with pytest.raises(ConfigError, match=r"data\.path.*row 0"):
        load_prompts(_cfg(path), TOK)


def test_invalid_json_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": oops}\n')
    with pytest.raises(ConfigError) as e:
        load_prompts(_cfg(path), TOK)
    msg = str(e.value)
    assert "data.path" in msg and "line 3" in msg and "JSON" in msg


def test_json_line_not_an_object(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n["prompt", "b"]\n')
    with pytest.raises(ConfigError, match=r"data\.path.*line 2"):
        load_prompts(_cfg(path), TOK)


# --------------------------------------------------------------------------- arithmetic task

def _key(row):
    return row["a"], row["op"], row["b"]


def _answer(a, op, b):
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def test_arithmetic_deterministic_for_seed():
    assert arithmetic_problems(50, seed=3) == arithmetic_problems(50, seed=3)
    assert arithmetic_problems(50, seed=3) != arithmetic_problems(50, seed=4)
    held = arithmetic_problems(20, seed=3, split="heldout")
    assert held == arithmetic_problems(20, seed=3, split="heldout")


def test_arithmetic_answers_correct_and_distinct():
    rows = arithmetic_problems(200, seed=0)
    assert len(rows) == 200
    assert len({_key(r) for r in rows}) == 200
    for r in rows:
        assert set(r) == {"prompt", "answer", "a", "b", "op"}
        assert r["op"] in "+-*"
        assert r["answer"] == _answer(r["a"], r["op"], r["b"])
        assert str(r["a"]) in r["prompt"] and str(r["b"]) in r["prompt"]
    assert {r["op"] for r in rows} == {"+", "-", "*"}


def test_arithmetic_splits_disjoint():
    for seed in (0, 1):
        train = arithmetic_problems(300, seed=seed, split="train")
        held = arithmetic_problems(60, seed=seed, split="heldout")
        assert not {_key(r) for r in train} & {_key(r) for r in held}
        assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
        for r in held:
            assert r["answer"] == _answer(r["a"], r["op"], r["b"])
    # across seeds too: a question's split does not depend on the seed
    train_all = {_key(r) for s in range(3) for r in arithmetic_problems(200, seed=s)}
    held_all = {_key(r) for s in range(3) for r in arithmetic_problems(50, seed=s, split="heldout")}
    assert not train_all & held_all


def test_arithmetic_bad_split():
    with pytest.raises(ValueError, match="split"):
        arithmetic_problems(3, seed=0, split="test")


def test_the_task_family():
    """Built-in tasks register themselves in their own modules; data/ imports nothing of reward/ (above it)."""
    from optune_nemo.data.tasks import TASKS, check, get_task

    assert get_task("arithmetic").problems is arithmetic_problems
    check(DataConfig(task="arithmetic"))
    with pytest.raises(ConfigError) as e:
        check(DataConfig(task="poetry"))
    assert str(e.value) == f"data.task: must be one of {', '.join(TASKS.names())} (got 'poetry')"
    with pytest.raises(ConfigError, match="^data.task: must be one of arithmetic"):
        get_task("poetry")
    code = ("import sys; from optune_nemo.data.tasks import get_task; get_task('arithmetic'); "
            "print(any(m.startswith('optune_nemo.reward') for m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr


def test_load_prompts_builtin_task():
    prompts = load_prompts(_cfg(None, num_prompts=16, max_prompt_length=512), TOK, seed=5)
    rows = arithmetic_problems(16, seed=5)
    assert [p.prompt_id for p in prompts] == list(range(16))
    assert [p.text for p in prompts] == [r["prompt"] for r in rows]
    for p, r in zip(prompts, rows, strict=True):
        assert p.metadata == {"answer": r["answer"], "a": r["a"], "b": r["b"], "op": r["op"]}
        assert list(p.token_ids) == _template([{"role": "user", "content": r["prompt"]}])
    held = load_prompts(_cfg(None, num_prompts=8, max_prompt_length=512), TOK, split="heldout", seed=5)
    assert not {p.text for p in held} & {p.text for p in prompts}
