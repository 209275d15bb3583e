"""Megatron GPTModel weights (any TP / PP layout) -> a Hugging Face directory `transformers` loads.

The inverse of `hf_import` (its module docstring has the layout table). Tensor-parallel shards are
all-gathered inside each pipeline stage, turned into HF tensors on the stage's first TP rank of data-
parallel rank 0, and gathered to global rank 0, which writes (peak memory there: the whole model once):

    config.json                      architecture preserved; the source config's other keys kept
    generation_config.json
    model.safetensors                or model-0000k-of-0000n.safetensors + model.safetensors.index.json
    tokenizer files                  whatever `tokenizer.save(dir)` writes

Written into a staging sibling and renamed at the end (`runtime.fileio.staged_dir`): `out_dir` appears
complete or not at all.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
import torch.distributed as tdist

from optune_nemo.config import ModelConfig
from optune_nemo.megatron.hf_import import (
    LAYER_PATTERN,
    SUPPORTED_ARCHITECTURES,
    global_layer_numbers,
    unwrap_model,
)
from optune_nemo.runtime.fileio import staged_dir

log = logging.getLogger(__name__)

_DROP_KEYS = ("quantization_config", "transformers_version", "_name_or_path", "rope_scaling",
              "torch_dtype", "dtype")


# --------------------------------------------------------------------------- megatron -> HF tensors


def _head_dim(m: ModelConfig) -> int:
    return m.kv_channels or m.hidden_size // m.num_attention_heads


def _split_qkv(shards: list[torch.Tensor], m: ModelConfig, prefix: str, suffix: str) -> dict:
    """Rank blocks concatenated are the global per-group [q; k; v] layout (ranks own whole groups)."""
    full, hd = torch.cat(shards, 0), _head_dim(m)
    q_per_g = m.num_attention_heads // m.num_query_groups
    tail = full.shape[1:]
    grouped = full.reshape(m.num_query_groups, (q_per_g + 2) * hd, *tail)
    q, k, v = grouped.split([q_per_g * hd, hd, hd], dim=1)
    return {f"{prefix}self_attn.{n}_proj.{suffix}": t.reshape(-1, *tail)
            for n, t in zip("qkv", (q, k, v), strict=True)}


def _layer_to_hf(layer: int, suffix: str, shards: list[torch.Tensor], m: ModelConfig) -> dict:
    p = f"model.layers.{layer}."
    if suffix == "self_attention.linear_qkv.weight":
        return _split_qkv(shards, m, p, "weight")
    if suffix == "self_attention.linear_qkv.bias":
        return _split_qkv(shards, m, p, "bias")
    if suffix == "self_attention.linear_proj.weight":
        return {p + "self_attn.o_proj.weight": torch.cat(shards, 1)}
    if suffix == "mlp.linear_fc1.weight":
        # each rank holds [gate_r; up_r]: concatenating the ranks would interleave them
        halves = [s.chunk(2, 0) for s in shards]
        return {p + "mlp.gate_proj.weight": torch.cat([h[0] for h in halves], 0),
                p + "mlp.up_proj.weight": torch.cat([h[1] for h in halves], 0)}
    if suffix == "mlp.linear_fc2.weight":
        return {p + "mlp.down_proj.weight": torch.cat(shards, 1)}
    if suffix in ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"):
        return {p + "input_layernorm.weight": shards[0]}
    if suffix in ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"):
        return {p + "post_attention_layernorm.weight": shards[0]}
    raise ValueError(f"megatron parameter decoder.layers.*.{suffix} has no Hugging Face counterpart")


def megatron_to_hf_tensors(name: str, shards: list[torch.Tensor], m: ModelConfig, *, vocab_size: int,
                           layer_map: dict[int, int]) -> dict[str, torch.Tensor]:
    """HF tensors of one megatron parameter given its TP shards in rank order (one shard when the
    parameter is replicated). The tied output layer maps to nothing (HF re-ties it)."""
    match = LAYER_PATTERN.match(name)
    if match:
        return _layer_to_hf(layer_map[int(match.group(1))], match.group(2), shards, m)
    if name == "embedding.word_embeddings.weight":
        return {"model.embed_tokens.weight": torch.cat(shards, 0)[:vocab_size]}
    if name == "output_layer.weight":
        if not m.untie_embeddings_and_output_weights:
            return {}
        return {"lm_head.weight": torch.cat(shards, 0)[:vocab_size]}
    if name == "decoder.final_layernorm.weight":
        return {"model.norm.weight": shards[0]}
    raise ValueError(f"megatron parameter {name} has no Hugging Face counterpart")


def _tp_shards(param: torch.Tensor, dist) -> list[torch.Tensor]:
    if dist is None or dist.tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return [param.detach()]
    parts = [torch.empty_like(param) for _ in range(dist.tp_size)]
    tdist.all_gather(parts, param.detach().contiguous(), group=dist.tp_group)
    return parts


def iter_hf_tensors(model_chunks, model_cfg: ModelConfig, *, vocab_size: int, dist=None,
                    dtype: torch.dtype | None = None, to_cpu: bool = False):
    """(HF name, whole tensor) of this rank's chunks, converted from megatron names and layouts. Collective
    over the tensor-parallel group (every TP rank joins each all-gather); only the first TP rank of
    data-parallel rank 0 yields (its pipeline stage's tensors), the other ranks yield nothing."""
    keep = dist is None or (dist.tp_rank == 0 and dist.dp_rank == 0)
    for chunk in model_chunks:
        chunk = unwrap_model(chunk)
        layer_map = global_layer_numbers(chunk)
        for name, param in chunk.named_parameters():
            shards = _tp_shards(param, dist)
            if not keep:
                continue
            if to_cpu:
                shards = [s.cpu() for s in shards]
            for hf_name, t in megatron_to_hf_tensors(name, shards, model_cfg, vocab_size=vocab_size,
                                                     layer_map=layer_map).items():
                yield hf_name, (t if dtype is None else t.to(dtype)).contiguous()


def collect_hf_state_dict(model_chunks, model_cfg: ModelConfig, *, vocab_size: int, dist=None,
                          dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor] | None:
    """The full HF state dict on global rank 0 (None elsewhere), on the CPU. Collective over all ranks."""
    mine = {k: v.clone() for k, v in iter_hf_tensors(model_chunks, model_cfg, vocab_size=vocab_size, dist=dist,
                                                     dtype=dtype, to_cpu=True)}
    if dist is None or dist.world_size == 1:
        return mine
    parts: list | None = [None] * dist.world_size if dist.rank == 0 else None
    tdist.gather_object(mine, parts, dst=0)
    if dist.rank != 0:
        return None
    out: dict[str, torch.Tensor] = {}
    for part in parts:
        out.update(part)
    return out


# --------------------------------------------------------------------------- writing


def hf_config_dict(model_cfg: ModelConfig, *, architecture: str, vocab_size: int, base: dict | None = None,
                   dtype: torch.dtype = torch.float32) -> dict:
    """config.json content: `base` (the source model's config) with every field the weights define
    replaced by the values of `model_cfg`."""
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"architecture: must be one of {', '.join(SUPPORTED_ARCHITECTURES)} "
                         f"(got {architecture!r})")
    m = model_cfg
    cfg = {k: v for k, v in (base or {}).items() if k not in _DROP_KEYS}
    cfg.update(
        architectures=[architecture], model_type=architecture.removesuffix("ForCausalLM").lower(),
        vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups, head_dim=_head_dim(m), rms_norm_eps=m.norm_epsilon,
        hidden_act="silu", tie_word_embeddings=not m.untie_embeddings_and_output_weights,
        # both spellings: transformers 5 reads rope_parameters / dtype, 4.57 (TensorRT-LLM 1.2's pin, in the
        # GPU container) reads rope_theta / torch_dtype and would otherwise fall back to base 10000
        rope_parameters={"rope_type": "default", "rope_theta": float(m.rotary_base)},
        rope_theta=float(m.rotary_base),
        dtype=str(dtype).removeprefix("torch."), torch_dtype=str(dtype).removeprefix("torch."))
    cfg.setdefault("max_position_embeddings", m.seq_length)
    return cfg


def _shard_groups(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def write_safetensors(state: dict[str, torch.Tensor], directory: Path, *, max_shard_bytes: int) -> list[str]:
    """model.safetensors, or shards with model.safetensors.index.json when larger than max_shard_bytes."""
    from safetensors.torch import save_file

    groups = _shard_groups(state, max_shard_bytes)
    if len(groups) == 1:
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    weight_map, files = {}, []
    for i, names in enumerate(groups, start=1):
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: state[n] for n in names}, str(directory / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, fname))
        files.append(fname)
    total = sum(t.numel() * t.element_size() for t in state.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return files


def write_hf_files(directory: Path, config: dict, state: dict[str, torch.Tensor], tokenizer, *,
                   max_shard_bytes: int) -> list[str]:
    """config.json, the weights (`write_safetensors`) and the tokenizer's files (when there is one) into
    `directory`; returns the weight files."""
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    files = write_safetensors(state, directory, max_shard_bytes=max_shard_bytes)
    if tokenizer is not None:
        tokenizer.save(directory)
    return files


def _generation_config(tokenizer, base: dict | None) -> dict:
    if base:
        return {k: v for k, v in base.items() if k != "transformers_version"}
    cfg = {}
    if tokenizer is not None:
        stops = list(getattr(tokenizer, "stop_token_ids", ()) or [tokenizer.eos_token_id])
        cfg = {"eos_token_id": stops if len(stops) > 1 else stops[0], "pad_token_id": tokenizer.pad_token_id}
        if getattr(tokenizer, "bos_token_id", None) is not None:
            cfg["bos_token_id"] = tokenizer.bos_token_id
    return cfg


def export_hf(model_chunks, model_cfg: ModelConfig, out_dir: str | Path, *, tokenizer, architecture: str,
              dist=None, vocab_size: int | None = None, hf_config: dict | None = None,
              generation_config: dict | None = None, dtype: torch.dtype = torch.float32,
              max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> Path | None:
    """Write the policy (`model_chunks`: this rank's GPTModel chunks, DDP-wrapped or bare) as an HF
    directory. Collective: every rank calls it; rank 0 writes and returns the path, others None.

    `vocab_size` (the unpadded rows) defaults to `hf_config["vocab_size"]`, then `tokenizer.vocab_size`.
    `hf_config` / `generation_config`: the source model's dicts, kept except for what the weights define.
    """
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"architecture: must be one of {', '.join(SUPPORTED_ARCHITECTURES)} "
                         f"(got {architecture!r})")
    vocab = vocab_size or (hf_config or {}).get("vocab_size") or tokenizer.vocab_size
    rank0 = dist is None or dist.rank == 0
    # rank 0 stages before the collective, so a refused out_dir costs no gather
    with staged_dir(out_dir, overwrite=overwrite) if rank0 else contextlib.nullcontext() as tmp:
        state = collect_hf_state_dict(model_chunks, model_cfg, vocab_size=vocab, dist=dist, dtype=dtype)
        if not rank0:
            return None
        config = hf_config_dict(model_cfg, architecture=architecture, vocab_size=vocab, base=hf_config,
                                dtype=dtype)
        gen = _generation_config(tokenizer, generation_config)
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
        files = write_hf_files(tmp, config, state, tokenizer, max_shard_bytes=max_shard_bytes)
        log.info("exported %d tensors (%d files) to %s", len(state), len(files), out_dir)
    return Path(out_dir)
