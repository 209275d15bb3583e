"""The core attention of every transformer layer, under the local AND the Transformer Engine layer spec.

Why the project has its own: the packed, prefix-shared rows of `packing.py` hold many pairs, and each
response may see only its own prompt and itself. Megatron's local DotProductAttention honours a dense
[1, 1, S, S] mask, but it repeats K/V for every head and materialises S x S fp32 scores per head; the TE
spec's TEDotProductAttention is built with `attn_mask_type=causal` and then IGNORES the mask (TE reads it
only for padding / arbitrary mask types): under TE a rejected response would attend to its chosen
sibling, and later pairs to earlier ones. `layer_spec` (model.py) puts `PackedCoreAttention` in both specs;
the TE spec keeps TE's norms and linear layers (FP8 GEMMs stay).

What a layer is handed as megatron's `attention_mask`, and what it does with it:

    SegmentIds (a packed row)   token i sees token j iff same group, j <= i, and j in the prompt (branch 0)
                                or in i's own branch; padding (group -1) sees itself only.
                                backend flex: FlexAttention with a block mask built on the device from the
                                ids (blocks across pairs skipped), grouped-query attention without
                                repeating K/V (enable_gqa). backend sdpa: scaled_dot_product_attention with
                                the boolean mask built on the device from the ids. Either is built ONCE per
                                micro-batch (by the first layer) and reused by every layer.
    None                        plain causal: SDPA with is_causal (the reward model, full-sequence forwards).
    a bool tensor [B, 1, S, S]  megatron's convention, True = masked: SDPA with its complement.

`model.attention_backend`: `auto` is flex on a CUDA device and sdpa elsewhere. FlexAttention on CPU (torch
2.13) runs only eagerly through its unfused reference path and has no backward: `flex` there is for
forward-only checks, and training with it raises. `local` keeps megatron's DotProductAttention (dense
mask) in the local spec; it is refused with the TE spec (config.validate).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from optune_nemo.megatron.packing import SegmentIds

BACKENDS = ("auto", "flex", "sdpa", "local")
"""The values of `model.attention_backend`."""


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs on `device`: `auto` is flex on CUDA, sdpa elsewhere."""
    if backend == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    return backend


@functools.cache
def _compiled_flex():
    # FlexAttention is only fused when compiled; a new row length recompiles once, then dynamo marks the
    # sequence dimension dynamic (automatic dynamic shapes)
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex(q_BHSD, k_BGSD, v_BGSD, segments: SegmentIds, *, scale: float | None) -> torch.Tensor:
    """FlexAttention over the packed rows (compiled on CUDA; eager, forward-only on CPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    if q_BHSD.is_cuda:
        fn = _compiled_flex()
    else:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q_BHSD, k_BGSD, v_BGSD)):
            from optune_nemo.config import ConfigError

            raise ConfigError("model.attention_backend: flex has no backward on CPU in this torch "
                              f"({torch.__version__}); use auto or sdpa to train on CPU")
        fn = flex_attention
    return fn(q_BHSD, k_BGSD, v_BGSD, block_mask=segments.block_mask(), scale=scale,
              enable_gqa=q_BHSD.shape[1] != k_BGSD.shape[1])


class PackedCoreAttention(MegatronModule):
    """megatron's `core_attention` submodule (its CoreAttention protocol): [sq, b, np, hn] queries and
    [sk, b, ng, hn] keys / values in, [sq, b, np * hn] out. Heads and groups are read from the tensors
    (this tensor-parallel rank's share). Builder keywords are megatron's DotProductAttention's; `backend` is
    `model.attention_backend` (bound by `layer_spec` with functools.partial)."""

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type: str = "self",
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None, *, backend: str = "auto"):
        super().__init__(config=config)
        if backend not in BACKENDS or backend == "local":
            raise ValueError(f"PackedCoreAttention backend: one of auto, flex, sdpa (got {backend!r})")
        if config.context_parallel_size != 1:
            raise NotImplementedError("PackedCoreAttention: context parallelism is not supported")
        if getattr(config, "softmax_type", "vanilla") != "vanilla" or getattr(config, "window_size", None):
            raise NotImplementedError("PackedCoreAttention: vanilla softmax without a sliding window only")
        self.backend, self.layer_number = backend, max(1, layer_number)
        self.softmax_scale = softmax_scale      # None: 1 / sqrt(head dim), SDPA's and flex's default
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("PackedCoreAttention: no packed_seq_params (THD) or attention_bias")
        sq, b = query.shape[:2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))      # [b, heads, s, hn]
        gqa = q.shape[1] != k.shape[1]
        dropout = self.dropout_p if self.training else 0.0
        if isinstance(attention_mask, SegmentIds):
            if resolve_backend(self.backend, q.device) == "flex":
                if dropout:
                    raise NotImplementedError("model.attention_backend=flex: attention dropout is not supported")
                out = flex(q, k, v, attention_mask, scale=self.softmax_scale)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask.allowed_B1SS(),
                                                     dropout_p=dropout, scale=self.softmax_scale, enable_gqa=gqa)
        elif attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=sq > 1,
                                                 scale=self.softmax_scale, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask.bool(), dropout_p=dropout,
                                                 scale=self.softmax_scale, enable_gqa=gqa)
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)
