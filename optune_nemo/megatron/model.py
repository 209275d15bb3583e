"""A Llama-style megatron-core GPTModel built from `ModelConfig`.

RMSNorm, SwiGLU MLP, RoPE (configurable base), grouped-query attention, no linear biases (optional
QKV bias for Qwen2), tied or untied embeddings. Layer spec: the local (pure torch) spec, or the
Transformer Engine spec when `model.transformer_impl=transformer_engine` and TE is installed; either
with the project's core attention (megatron/attention.py, `model.attention_backend`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F

from optune_nemo.config import ConfigError, ModelConfig
from optune_nemo.runtime.seeding import mix_seed

try:
    import transformer_engine  # noqa: F401

    HAVE_TE = True
except ImportError:
    HAVE_TE = False


def padded_vocab_size(vocab_size: int, model_cfg: ModelConfig, tp_size: int) -> int:
    """The embedding rows: vocab_size rounded up to a multiple of lcm(make_vocab_size_divisible_by,
    tp). Megatron's usual `divisible_by * tp` changes the row count with the TP size, and with it
    every random draw of the initialisation; the lcm keeps the same padded vocabulary (hence the
    same initial weights) for every TP size that divides make_vocab_size_divisible_by."""
    multiple = math.lcm(model_cfg.make_vocab_size_divisible_by, tp_size)
    return -(-vocab_size // multiple) * multiple


def precision_kwargs(precision: str, fp8_cfg=None) -> dict:
    """TransformerConfig keywords of `precision` (fp32 | bf16 | fp8)."""
    if precision == "fp32":
        return {"params_dtype": torch.float32, "bf16": False}
    kwargs = {"params_dtype": torch.bfloat16, "bf16": True}
    if precision == "fp8":
        if not (HAVE_TE and torch.cuda.is_available()):
            raise ConfigError("precision: fp8 needs a CUDA GPU with Transformer Engine (the NGC container, "
                              "docs/container.md); use bf16 or fp32 here")
        kwargs.update(fp8=fp8_cfg.format, fp8_recipe=fp8_cfg.recipe, fp8_margin=fp8_cfg.margin,
                      fp8_amax_history_len=fp8_cfg.amax_history_len,
                      fp8_amax_compute_algo=fp8_cfg.amax_compute_algo)
    return kwargs


def build_transformer_config(model_cfg: ModelConfig, *, tp_size: int, pp_size: int,
                             params_dtype: torch.dtype = torch.float32, precision: str = "fp32", fp8_cfg=None):
    from megatron.core.transformer import TransformerConfig

    on_gpu = torch.cuda.is_available()
    prec = precision_kwargs(precision, fp8_cfg) if precision != "fp32" else {"params_dtype": params_dtype,
                                                                             "bf16": params_dtype == torch.bfloat16}
    return TransformerConfig(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        ffn_hidden_size=model_cfg.ffn_hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
        kv_channels=model_cfg.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=model_cfg.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model_cfg.add_qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model_cfg.init_method_std,
        tensor_model_parallel_size=tp_size,
        pipeline_model_parallel_size=pp_size,
        pipeline_dtype=prec["params_dtype"],
        **prec,
        use_cpu_initialization=not on_gpu,
        # SwiGLU and the residual add go through megatron's jit_fuser (torch.compile: Triton kernels) on a GPU;
        # on CPU each new row length would cost an inductor C++ compile, so the plain torch paths run there.
        # The masked-softmax, persistent-norm, RoPE and wgrad fusions need Apex / TE kernels; the core attention
        # is megatron/attention.py's (fused SDPA / FlexAttention kernels) and never uses megatron's softmax.
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        sequence_parallel=False,
    )


def layer_spec(model_cfg: ModelConfig, *, init_seed: int | None = None):
    """The layer spec: megatron's local or Transformer Engine spec with the project's core attention
    (`attention.PackedCoreAttention`, `model.attention_backend`) in place of the spec's own; the TE spec keeps
    TE's norms and linear layers (FP8 GEMMs). `attention_backend=local` keeps megatron's DotProductAttention
    (local spec only: TE's DotProductAttention is built causal and ignores the packed rows' mask).

    With `init_seed`, every layer draws its initial weights from a generator state seeded by (init_seed,
    global layer number), so a pipeline stage builds the same layers as a single rank does (otherwise stage
    k would continue the RNG stream where stage k-1's rank began)."""
    from megatron.core.models.gpt import gpt_layer_specs

    backend = model_cfg.attention_backend
    if model_cfg.transformer_impl == "transformer_engine":
        if not HAVE_TE:
            raise ConfigError(
                "model.transformer_impl: transformer_engine is not installed; install "
                "`optune-nemo[gpu]` or use the NGC container (see docs/container.md), or set local")
        if backend == "local":
            raise ConfigError("model.attention_backend: local is the local spec's; with transformer_engine use "
                              "auto, flex or sdpa (TE's own core attention ignores the packed pairs' mask)")
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    if backend != "local":
        spec = with_core_attention(spec, backend)
    if init_seed is not None:
        spec.module = _seeded_layer_class(spec.module, init_seed)
    return spec


def with_core_attention(spec, backend: str):
    """`spec` (a TransformerLayer ModuleSpec) with its self-attention's core_attention replaced by
    `attention.PackedCoreAttention` running `backend`; every other submodule is kept (a copy: megatron's spec
    functions may hand out shared objects)."""
    from optune_nemo.megatron.attention import PackedCoreAttention

    attention = spec.submodules.self_attention
    submodules = dataclasses.replace(attention.submodules,
                                     core_attention=functools.partial(PackedCoreAttention, backend=backend))
    layer = dataclasses.replace(spec.submodules, self_attention=dataclasses.replace(attention, submodules=submodules))
    return dataclasses.replace(spec, submodules=layer)


def _seeded_layer_class(base, init_seed: int):
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    class SeededLayer(base):
        def __init__(self, config, submodules, layer_number: int = 1, *args, **kwargs):
            global_number = layer_number + get_transformer_layer_offset(config, kwargs.get("vp_stage"))
            torch.manual_seed(mix_seed(init_seed, "layer", global_number))
            super().__init__(config, submodules, layer_number, *args, **kwargs)

    SeededLayer.__name__ = SeededLayer.__qualname__ = base.__name__
    return SeededLayer


def build_gpt_model(model_cfg: ModelConfig, *, vocab_size: int, tp_size: int = 1, pp_size: int = 1,
                    pre_process: bool = True, post_process: bool = True,
                    params_dtype: torch.dtype = torch.float32, precision: str = "fp32", fp8_cfg=None,
                    init_seed: int | None = None):
    """This rank's GPTModel chunk. `vocab_size` is the tokenizer's; the embedding is padded.
    Call after `init_distributed` (megatron's parallel state must exist)."""
    from megatron.core.models.gpt import GPTModel

    config = build_transformer_config(model_cfg, tp_size=tp_size, pp_size=pp_size, params_dtype=params_dtype,
                                      precision=precision, fp8_cfg=fp8_cfg)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(model_cfg, init_seed=init_seed),
        vocab_size=padded_vocab_size(vocab_size, model_cfg, tp_size),
        max_sequence_length=model_cfg.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not model_cfg.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=model_cfg.rotary_base,
    )
    if config.params_dtype != torch.float32:
        # megatron's torch-norm fallback (no Apex/TE) builds its norms in fp32 whatever params_dtype says; a
        # parameter group mixing fp32 and bf16 parameters (Qwen2's bf16 QKV biases beside fp32 norms in the
        # no-weight-decay group) makes megatron-core 0.16's DistributedOptimizer pair parameters with the
        # wrong main weights when it checkpoints. Transformer Engine's norms are already in params_dtype.
        for module in model.modules():
            if isinstance(module, (torch.nn.RMSNorm, torch.nn.LayerNorm)):
                module.to(config.params_dtype)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
