"""The tokenizer protocol the system uses (names mirror Hugging Face's), and a byte-level
tokenizer for the embedded default: no download, exact round trip on any text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    vocab_size: int
    eos_token_id: int
    pad_token_id: int
    stop_token_ids: tuple[int, ...]
    """Ids that end a response (EOS and end-of-turn)."""

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""
        ...

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ...

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """The conversation rendered with the generation prompt appended, as ids."""
        ...

    def save(self, directory: str | Path) -> None:
        ...


SPECIALS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


class ByteTokenizer:
    """Ids 0-255 are the UTF-8 bytes; specials follow. Chat template:
    `<|bos|>` then per message `<|role|> content <|end|>`, then `<|assistant|>`; a response ends
    with `<|end|>` or `<|eos|>`."""

    def __init__(self):
        self.special_ids = {tok: 256 + i for i, tok in enumerate(SPECIALS)}
        self.vocab_size = 256 + len(SPECIALS)
        self.pad_token_id = self.special_ids["<|pad|>"]
        self.bos_token_id = self.special_ids["<|bos|>"]
        self.eos_token_id = self.special_ids["<|eos|>"]
        self.stop_token_ids = (self.special_ids["<|end|>"], self.eos_token_id)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out, names = bytearray(), {v: k for k, v in self.special_ids.items()}
        for i in ids:
            i = int(i)
            if i < 256:
                out.append(i)
            elif not skip_special_tokens and i in names:
                out += names[i].encode()
        return out.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        ids = [self.bos_token_id]
        for m in messages:
            role = m["role"]
            if f"<|{role}|>" not in self.special_ids:
                raise ValueError(f"chat message role must be system, user or assistant (got {role!r})")
            ids += [self.special_ids[f"<|{role}|>"], *self.encode(m["content"]), self.special_ids["<|end|>"]]
        return ids + [self.special_ids["<|assistant|>"]]

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "byte_tokenizer.json").write_text(json.dumps({"specials": SPECIALS}))
