"""Prompt sources, tokenizers and built-in tasks."""

from optune_nemo.data.prompts import load_prompts
from optune_nemo.data.tokenizer import ByteTokenizer, Tokenizer

__all__ = ["ByteTokenizer", "Tokenizer", "load_prompts"]
