"""Generation engines behind one interface (`types.GenerationEngine`), chosen by `generation.engine`."""

from __future__ import annotations

from optune_nemo.config import ConfigError, GenerationConfig


def build_engine(cfg: GenerationConfig, *, model, tokenizer, dist, vocab_size: int, max_sequence_length: int):
    """The engine named by `generation.engine`. Never substitutes another one silently."""
    if cfg.engine == "torch":
        from optune_nemo.generation.torch_engine import TorchEngine

        return TorchEngine(model, decode=tokenizer.decode, dist=dist, vocab_size=vocab_size,
                           batch_size=cfg.batch_size, max_sequence_length=max_sequence_length)
    raise ConfigError(f"generation.engine: must be torch (got {cfg.engine!r})")
