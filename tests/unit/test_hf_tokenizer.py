"""HFTokenizer: the project's tokenizer protocol over a transformers tokenizer."""

from __future__ import annotations

import pytest
from hf_tiny import CHAT_TEMPLATE, tiny_tokenizer

from optune_nemo.data.hf_tokenizer import HFTokenizer


def test_protocol_and_defaults():
    tok = HFTokenizer(tiny_tokenizer())
    assert tok.encode("hello world") == [5, 6]          # no BOS added
    assert tok.decode([1, 5, 6, 2]) == "hello world"
    assert tok.decode([5, 2], skip_special_tokens=False) == "hello </s>"
    assert (tok.eos_token_id, tok.pad_token_id, tok.vocab_size) == (2, 0, 250)
    assert tok.stop_token_ids == (2, 4)                 # EOS and <|im_end|>
    assert tok.apply_chat_template([{"role": "user", "content": "what is 2 + 3 ?"}]) == \
        [3, 13, 7, 8, 9, 10, 11, 12, 4, 3, 14]


def test_overrides_survive_save_and_load(tmp_path):
    template = CHAT_TEMPLATE.replace("<|im_start|>assistant", "<|im_start|>system")
    tok = HFTokenizer(tiny_tokenizer(), chat_template=template, stop_tokens=["<|im_end|>"], vocab_size=256)
    assert tok.stop_token_ids == (4,) and tok.vocab_size == 256
    tok.save(tmp_path)
    back = HFTokenizer.from_pretrained(tmp_path)
    assert back.stop_token_ids == (4,) and back.vocab_size == 256
    msgs = [{"role": "user", "content": "hello"}]
    assert back.apply_chat_template(msgs) == tok.apply_chat_template(msgs) == [3, 13, 5, 4, 3, 15]


def test_unknown_stop_token_is_refused():
    with pytest.raises(ValueError, match="stop token '<nope>' is not in the vocabulary"):
        HFTokenizer(tiny_tokenizer(), stop_tokens=["<nope>"])
