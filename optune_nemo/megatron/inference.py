"""Incremental (KV-cached) forward of the policy's megatron GPTModel chunk, for the torch engine.

The engine (`generation/torch_engine.py`) batches, samples and owns the cache; this module drives the
GPTModel's own modules (embedding, per-layer norms, QKV / output / MLP linears with their
tensor-parallel communication, the rotary table, final norm, output layer) on the training weights
themselves, with per-row positions: megatron's static inference context advances one scalar position
for the whole batch, so prompts of different lengths would see shifted RoPE positions and sample from
a slightly different distribution than the one the policy is trained on.

Every tensor made here is made on the model's device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from optune_nemo.megatron.cpu_compat import cpu_compat_suspended
from optune_nemo.runtime.distributed import DistEnv, broadcast_object


class MegatronDecoder:
    """`generation.torch_engine.IncrementalModel` on this rank's GPTModel chunk (any TP, any PP)."""

    def __init__(self, model, *, dist: DistEnv, vocab_size: int, max_sequence_length: int):
        self.model, self.dist = model, dist
        self.vocab_size, self.max_sequence_length = vocab_size, max_sequence_length
        self.num_layers = len(model.decoder.layers)
        self.is_last_stage = model.post_process
        self.drives_cache = True   # forward follows the cache contract: static caches and CUDA graphs work
        self._rotary_table = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @contextlib.contextmanager
    def generating(self) -> Iterator[None]:
        """Eval mode, no autograd, and the CPU compatibility layer's per-call dispatch suspended (~6 % of
        decoding); the training mode is restored afterwards."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode(), cpu_compat_suspended():
                yield
        finally:
            self.model.train(was_training)

    # ------------------------------------------------------------------ one step

    def _rotary(self, positions_RS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of this step's positions [S, R, 1, dim] in the model's dtype: computed once per step
        for every layer, exactly as megatron's apply_rotary_pos_emb computes them per call."""
        if self._rotary_table is None:   # depends on no weight: computed once
            self._rotary_table = self.model.rotary_pos_emb(self.max_sequence_length)[:, 0, 0]   # [L, dim]
        freqs = self._rotary_table[positions_RS.clamp(min=0)].transpose(0, 1).unsqueeze(2)
        return torch.cos(freqs).to(self.dtype), torch.sin(freqs).to(self.dtype)

    def _attention(self, layer, hidden_SRH, rope, cache, li: int):
        attn = layer.self_attention
        q, k, v = attn.get_query_key_value_tensors(hidden_SRH, None)[:3]   # [S, R, heads, dim]
        q, k = _apply_rope(q, *rope), _apply_rope(k, *rope)
        ctx = cache.attend(li, q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3),
                           v.permute(1, 2, 0, 3))                           # [R, heads, S, dim]
        S, R = hidden_SRH.shape[:2]
        out, bias = attn.linear_proj(ctx.permute(2, 0, 1, 3).reshape(S, R, -1))
        return out if bias is None else out + bias

    def forward(self, tokens_RS: torch.Tensor, positions_RS: torch.Tensor, cache) -> torch.Tensor | None:
        """Logits of the last position [R, V] float32 (gathered over TP, padded vocabulary cut) on the
        last pipeline stage, None on the others; appends this step's keys/values to this stage's `cache`
        (`cache.length` slots filled before, `cache.start_R` each row's first valid slot). Stages pass
        hidden states with send/recv."""
        from megatron.core import tensor_parallel

        m, d = self.model, self.dist
        S, R = tokens_RS.shape[1], tokens_RS.shape[0]
        if m.pre_process:
            hidden = m.embedding(input_ids=tokens_RS, position_ids=positions_RS)   # [S, R, H]
        else:
            hidden = torch.empty(S, R, m.config.hidden_size, dtype=self.dtype, device=self.device)
            torch.distributed.recv(hidden, src=self._pp_neighbour(-1), group=d.pp_group)
        rope = self._rotary(positions_RS)
        cache.begin_step(S)                                                 # the mask, once for every layer
        for li, layer in enumerate(m.decoder.layers):
            residual = hidden
            hidden = residual + self._attention(layer, layer.input_layernorm(hidden), rope, cache, li)
            out, b = layer.mlp(layer.pre_mlp_layernorm(hidden))
            hidden = hidden + (out if b is None else out + b)
        cache.end_step(S)
        if not m.post_process:
            torch.distributed.send(hidden.contiguous(), dst=self._pp_neighbour(+1), group=d.pp_group)
            return None
        hidden = m.decoder.final_layernorm(hidden[-1:])
        weight = m.shared_embedding_or_output_weight() if m.share_embeddings_and_output_weights else None
        logits, _ = m.output_layer(hidden, weight=weight)
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
        return logits[0, :, : self.vocab_size].float()

    def _pp_neighbour(self, step: int) -> int:
        from megatron.core import parallel_state as ps

        return ps.get_pipeline_model_parallel_next_rank() if step > 0 else ps.get_pipeline_model_parallel_prev_rank()

    def from_last_stage(self, obj):
        """`obj` of the last pipeline stage on every stage (the sampled tokens); as is without PP."""
        if self.dist.pp_size == 1:
            return obj
        from optune_nemo.megatron.parallel import pipeline_last_rank

        return broadcast_object(obj, src=pipeline_last_rank(), group=self.dist.pp_group)


def _apply_rope(t_SRHD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (non-interleaved halves), the arithmetic of megatron's _apply_rotary_pos_emb_bshd
    with the cos/sin it would compute."""
    x1, x2 = torch.chunk(t_SRHD, 2, dim=-1)
    return t_SRHD * cos + torch.cat((-x2, x1), dim=-1) * sin
