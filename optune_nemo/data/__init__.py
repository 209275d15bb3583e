"""Prompt sources, tokenizers and built-in tasks."""

from optune_nemo.data.prompts import load_prompts
from optune_nemo.data.tokenizer import ByteTokenizer, Tokenizer


def build_tokenizer(cfg) -> Tokenizer:
    """The tokenizer of the run: the built-in byte-level one for the embedded tiny model."""
    return ByteTokenizer()


__all__ = ["ByteTokenizer", "Tokenizer", "build_tokenizer", "load_prompts"]
