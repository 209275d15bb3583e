"""Assembly of the parts every entry point needs (train, generate, the benchmarks, the GPU tests):
the model source, tokenizer, policy and engine, built the same way everywhere.

    cfg = resolve(cfg)                                 # model.* from policy.hf_path; no file written
    parts = build_policy_parts(cfg, load_weights=True) # dist, hf_dir, tokenizer, policy
    engine = build_engine(cfg.generation, parts)       # generation.engine on the policy
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from optune_nemo.config import OptuneNemoConfig


def resolve(cfg: OptuneNemoConfig) -> OptuneNemoConfig:
    """`cfg` with model.* replaced by the shape of `policy.hf_path` (read from config.json or a GGUF
    header; nothing is written) and precision=auto decided for this machine, ready for `config.validate`."""
    from optune_nemo.config import resolve_precision
    from optune_nemo.megatron.pretrained import with_source_shape

    return resolve_precision(with_source_shape(cfg))


def prepare_source(cfg: OptuneNemoConfig) -> Path | None:
    """The HF directory of `policy.hf_path` (a GGUF dequantised once into `policy.cache_dir`), or None."""
    if cfg.policy.hf_path is None:
        return None
    from optune_nemo.megatron.pretrained import inspect_source, materialise

    return materialise(inspect_source(cfg.policy.hf_path), cfg.policy.cache_dir)


def load_tokenizer(cfg: OptuneNemoConfig, hf_dir: Path | None):
    """The source model's tokenizer with the configured overrides, or the byte tokenizer of the tiny model."""
    if hf_dir is None:
        from optune_nemo.data import ByteTokenizer

        return ByteTokenizer()
    from optune_nemo.data.hf_tokenizer import HFTokenizer

    return HFTokenizer.from_pretrained(hf_dir, chat_template=cfg.policy.chat_template,
                                       stop_tokens=cfg.policy.stop_tokens)


@dataclass
class PolicyParts:
    dist: object
    hf_dir: Path | None
    tokenizer: object
    policy: object


def build_policy_parts(cfg: OptuneNemoConfig, *, hf_dir: Path | None = None, tokenizer=None,
                       load_weights: bool = True) -> PolicyParts:
    """Process groups, then the megatron policy on `cfg.model` (already `resolve`d); with `load_weights`
    the source model's weights are loaded (a resumed run loads its checkpoint instead)."""
    from optune_nemo.megatron.megatron_policy import build_policy
    from optune_nemo.megatron.parallel import init_distributed

    p = cfg.parallel
    dist = init_distributed(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                            timeout_minutes=p.distributed_timeout_minutes)
    if hf_dir is None:
        hf_dir = prepare_source(cfg)
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg, hf_dir)
    policy = build_policy(cfg, vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id, dist=dist,
                          hf_dir=hf_dir)
    if load_weights and hf_dir is not None:
        policy.load_hf_weights(hf_dir)
    return PolicyParts(dist, hf_dir, tokenizer, policy)


def build_engine(cfg: OptuneNemoConfig, parts: PolicyParts):
    """The engine `generation.engine` names, on the parts' policy."""
    from optune_nemo.generation import build_engine as _build

    return _build(cfg.generation, policy=parts.policy, tokenizer=parts.tokenizer, dist=parts.dist,
                  hf_dir=parts.hf_dir, max_sequence_length=cfg.model.seq_length)
