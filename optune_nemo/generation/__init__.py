"""Generation engines behind one interface (`types.GenerationEngine`), chosen by `generation.engine`."""

from __future__ import annotations

from optune_nemo.config import ConfigError, GenerationConfig


def build_engine(cfg: GenerationConfig, *, policy, tokenizer, dist, vocab_size: int, max_sequence_length: int,
                 hf_dir=None):
    """The engine named by `generation.engine`. Never substitutes another one silently: asking for
    trtllm where TensorRT-LLM is not installed is an error saying what to install."""
    if cfg.engine == "torch":
        from optune_nemo.generation.torch_engine import TorchEngine

        return TorchEngine(policy.unwrapped_model(), decode=tokenizer.decode, dist=dist, vocab_size=vocab_size,
                           batch_size=cfg.batch_size, max_sequence_length=max_sequence_length)
    if cfg.engine == "trtllm":
        from optune_nemo.generation.trtllm_engine import TrtllmEngine, require_trtllm

        require_trtllm()
        if dist.world_size > 1:
            raise ConfigError("generation.engine: trtllm inside a multi-rank training job is not wired yet "
                              "(it runs its own Ray workers); use it with one training rank")
        return TrtllmEngine.build(str(hf_dir), tokenizer=tokenizer, policy=policy,
                                  tensor_parallel_size=cfg.tensor_parallel_size, refit_mode=cfg.refit,
                                  kv_cache_fraction=cfg.kv_cache_fraction, max_seq_len=max_sequence_length,
                                  max_batch_size=max(cfg.batch_size * 2, 8),
                                  offload_during_training=cfg.offload_during_training)
    raise ConfigError(f"generation.engine: must be torch or trtllm (got {cfg.engine!r})")
