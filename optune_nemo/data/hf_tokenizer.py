"""A Hugging Face tokenizer behind the project's `Tokenizer` protocol (data/tokenizer.py).

Stop tokens: EOS, the ids of `generation_config.json`'s `eos_token_id`, and every end-of-turn token
the vocabulary knows (`<|im_end|>`, `<|eot_id|>`, `<|end|>`, `<end_of_turn>`, `<|endoftext|>`), unless
given explicitly. `vocab_size` is the model's embedding rows when known (config.json's `vocab_size`,
which can exceed the tokenizer's length, e.g. Qwen2), else the tokenizer's length, so the policy
embedding built from it matches the imported weights. Overrides (chat template, stop tokens, vocab
size) are saved beside the tokenizer files in `optune_tokenizer.json` and restored on load.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")
OVERRIDES_FILE = "optune_tokenizer.json"


class HFTokenizer:
    """`encode` adds no special tokens; `apply_chat_template` renders with the generation prompt."""

    def __init__(self, tokenizer, *, chat_template: str | None = None,
                 stop_tokens: Sequence[str | int] | None = None, vocab_size: int | None = None,
                 extra_eos_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer: has no eos_token; pass stop_tokens and set an eos token")
        self.eos_token_id = int(tokenizer.eos_token_id)
        self.bos_token_id = tokenizer.bos_token_id
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.eos_token_id)
        self._stop_override = list(stop_tokens) if stop_tokens is not None else None
        self.stop_token_ids = self._stop_ids(self._stop_override, extra_eos_ids)
        self._vocab_override = vocab_size
        self.vocab_size = int(max(vocab_size or 0, len(tokenizer)))

    def _id_of(self, token: str | int) -> int:
        if isinstance(token, int):
            return token
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == self.tokenizer.unk_token_id:
            raise ValueError(f"tokenizer stop token {token!r} is not in the vocabulary")
        return int(tid)

    def _stop_ids(self, stop_tokens, extra_eos_ids) -> tuple[int, ...]:
        if stop_tokens is not None:
            ids = [self._id_of(t) for t in stop_tokens]
        else:
            vocab = self.tokenizer.get_vocab()
            ids = [self.eos_token_id, *extra_eos_ids, *(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)]
        return tuple(dict.fromkeys(int(i) for i in ids))

    # ------------------------------------------------------------------ protocol

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """Rendered as text, then encoded without added specials (what HF does for tokenize=True)."""
        if not self.chat_template:
            raise ValueError("tokenizer: has no chat template; pass chat_template")
        text = self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template,
                                                  add_generation_prompt=True, tokenize=False)
        return self.encode(text)

    def save(self, directory: str | Path) -> None:
        """The HF tokenizer files plus the overrides, loadable by `from_pretrained`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        overrides = {"chat_template": self.chat_template, "stop_token_ids": list(self.stop_token_ids),
                     "vocab_size": self.vocab_size}
        (directory / OVERRIDES_FILE).write_text(json.dumps(overrides, indent=2) + "\n")

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, path: str | Path, *, gguf_file: str | None = None,
                        chat_template: str | None = None, stop_tokens: Sequence[str | int] | None = None,
                        vocab_size: int | None = None) -> HFTokenizer:
        """The tokenizer of an HF directory (or of `path/gguf_file`). Arguments override what the
        directory's `optune_tokenizer.json`, config.json and generation_config.json say."""
        from transformers import AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"tokenizer: {path} is not a directory")
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
        saved = _read_json(path / OVERRIDES_FILE)
        config = _read_json(path / "config.json")
        gen_eos = _read_json(path / "generation_config.json").get("eos_token_id")
        extra = gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []
        return cls(tok, chat_template=chat_template or saved.get("chat_template"),
                   stop_tokens=stop_tokens if stop_tokens is not None else saved.get("stop_token_ids"),
                   vocab_size=vocab_size or saved.get("vocab_size") or config.get("vocab_size"),
                   extra_eos_ids=extra)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
