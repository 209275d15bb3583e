"""KV-cached batched generation on the Megatron policy's own weights (no copy).

The engine drives the GPTModel's modules directly (embedding, per-layer norms, QKV / output /
MLP linears with their tensor-parallel communication, rotary tables, final norm, output layer)
with its own KV cache, because megatron's static inference context advances one scalar position
for the whole batch: prompts of different lengths would then see shifted RoPE positions and
sample from a slightly different distribution than the one the policy is trained on.

- Batches are formed by prompt length (sorted), so left padding is small; pads are masked and each
  row carries its own positions, so a row's numbers do not depend on its batch.
- Each prompt is prefilled ONCE; its cache rows are then repeated for its `n` samples.
- Rows that hit a stop token or max_new_tokens leave the batch (cache rows dropped).
- Sampling: temperature, top_k, top_p, greedy at temperature 0; sample j of the request with key k
  draws from a generator seeded by (seed, k, j), so results do not depend on batch composition,
  data-parallel sharding or tensor-parallel size. Padded-vocabulary ids are never sampled.
- Tensor parallel: vocab-parallel logits are gathered ([rows, V] is small) and every TP rank samples
  identically. Data parallel: prompts are dealt over DP ranks and results all-gathered.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from optune_nemo.policy.cpu_compat import cpu_compat_suspended
from optune_nemo.types import Sample, SamplingParams


def sample_generator(seed: int, key: int, j: int) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}:{key}:{j}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def filter_logits(logits_RV: torch.Tensor, *, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering; removed entries become -inf."""
    logits = logits_RV / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        logits = _nucleus(logits, top_p)
    return logits


def _nucleus(logits: torch.Tensor, top_p: float, candidates: int = 1024) -> torch.Tensor:
    """Drop a token when the probability mass of the tokens ranked above it already reaches top_p
    (the first token always stays). Exact: the ranking is taken over the top `candidates` tokens when
    they hold at least top_p of every row's mass (a full sort of the vocabulary otherwise)."""
    k = min(candidates, logits.shape[-1])
    top, order = torch.topk(logits, k, dim=-1)
    # probabilities under the FULL softmax, for the candidates only
    probs = torch.exp(top - torch.logsumexp(logits, -1, keepdim=True))
    if k < logits.shape[-1] and not bool((probs.sum(-1) >= top_p).all()):
        top, order = torch.sort(logits, dim=-1, descending=True)
        probs = top.softmax(-1)
    keep_sorted = probs.cumsum(-1) - probs < top_p
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def sample_tokens(logits_RV: torch.Tensor, params: SamplingParams,
                  generators: Sequence[torch.Generator]) -> list[int]:
    """One token per row: argmax at temperature 0, else a draw from the filtered softmax by inverse
    CDF with one uniform from the row's own generator (exact in distribution, independent of the
    other rows)."""
    if params.temperature == 0:
        return logits_RV.argmax(-1).tolist()
    probs = filter_logits(logits_RV.float(), temperature=params.temperature, top_k=params.top_k,
                          top_p=params.top_p).softmax(-1)
    cdf = probs.double().cumsum(-1)
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
    idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1)).squeeze(1)
    # never past the last token with mass (rounding at the top of the cdf)
    last = (probs > 0).to(torch.int64).cumsum(-1).argmax(-1)
    return torch.minimum(idx, last).tolist()


class _Cache:
    """Pre-allocated keys/values per layer, [R, groups, slots, dim], `slots` = longest prompt +
    max_new_tokens, filled in place; `length` slots are written. `start_R` is each row's first valid
    slot (its left padding)."""

    def __init__(self, num_layers: int, slots: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.slots, self.length = slots, 0
        self.start_R: torch.Tensor | None = None

    def write(self, li: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values of layer `li` ([R, groups, S, dim]); return all so far."""
        if self.k[li] is None:
            R, G, _, D = k.shape
            self.k[li] = k.new_empty(R, G, self.slots, D)
            self.v[li] = v.new_empty(R, G, self.slots, D)
        end = self.length + k.shape[2]
        self.k[li][:, :, self.length:end] = k
        self.v[li][:, :, self.length:end] = v
        return self.k[li][:, :, :end], self.v[li][:, :, :end]

    def select(self, rows: torch.Tensor) -> None:
        """Keep / repeat rows (prefix sharing, finished rows leaving)."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]
        self.start_R = self.start_R.index_select(0, rows)


class TorchEngine:
    """`types.GenerationEngine` on a megatron GPTModel chunk (pipeline size 1)."""

    def __init__(self, model, *, decode: Callable[[list[int]], str], dist, vocab_size: int,
                 batch_size: int, max_sequence_length: int):
        self.model, self.decode, self.dist = model, decode, dist
        self.vocab_size, self.batch_size = vocab_size, batch_size
        self.max_sequence_length = max_sequence_length
        self.last_stats: dict = {}
        self.forward_calls = 0   # model evaluations, for tests and stats
        self._rotary_table = None

    def begin_generation(self) -> None:
        """Nothing to do: the engine runs on the training weights themselves."""

    def end_generation(self) -> None:
        """Nothing to release: the KV cache lives only inside a generate() call."""

    # ------------------------------------------------------------------ the model, step by step

    def _rotary(self, positions_RS: torch.Tensor) -> torch.Tensor:
        if self._rotary_table is None:   # depends on no weight: computed once
            self._rotary_table = self.model.rotary_pos_emb(self.max_sequence_length)[:, 0, 0]   # [L, dim]
        return self._rotary_table[positions_RS.clamp(min=0)].transpose(0, 1).unsqueeze(2)  # [S, R, 1, dim]

    def _attention(self, layer, hidden_SRH, freqs, cache: _Cache, li: int, mask_RSK):
        from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

        attn = layer.self_attention
        q, k, v = attn.get_query_key_value_tensors(hidden_SRH, None)[:3]   # [S, R, heads, dim]
        cfg = attn.config
        q = apply_rotary_pos_emb(q, freqs, config=cfg)
        k = apply_rotary_pos_emb(k, freqs, config=cfg)
        keys, values = cache.write(li, k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3))  # [R, groups, T, dim]
        q = q.permute(1, 2, 0, 3)                                           # [R, heads, S, dim]
        # grouped-query attention without copying the cache to every head (head h uses group h // rep)
        ctx = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask_RSK.unsqueeze(1),
                                             enable_gqa=keys.shape[1] != q.shape[1])
        S, R = hidden_SRH.shape[:2]
        out, bias = attn.linear_proj(ctx.permute(2, 0, 1, 3).reshape(S, R, -1))
        return out if bias is None else out + bias

    def _forward(self, tokens_RS: torch.Tensor, positions_RS: torch.Tensor, cache: _Cache) -> torch.Tensor | None:
        """Logits of the last position [R, V] (gathered over TP) on the last pipeline stage, None on
        the others; appends to this stage's cache. Stages pass hidden states with send/recv."""
        from megatron.core import tensor_parallel

        self.forward_calls += 1
        m, d = self.model, self.dist
        S, R = tokens_RS.shape[1], tokens_RS.shape[0]
        if m.pre_process:
            hidden = m.embedding(input_ids=tokens_RS, position_ids=positions_RS)   # [S, R, H]
        else:
            hidden = torch.empty(S, R, m.config.hidden_size, dtype=m.config.params_dtype)
            torch.distributed.recv(hidden, src=self._pp_neighbour(-1), group=d.pp_group)
        freqs = self._rotary(positions_RS)
        total = cache.length + S
        slots = torch.arange(total)
        query_slots = slots[total - S:]
        # key slot visible to a query when it is not left padding and not in the future
        mask = (slots[None, None, :] >= cache.start_R[:, None, None]) & \
               (slots[None, None, :] <= query_slots[None, :, None])
        for li, layer in enumerate(m.decoder.layers):
            residual = hidden
            hidden = residual + self._attention(layer, layer.input_layernorm(hidden), freqs, cache, li, mask)
            out, bias = layer.mlp(layer.pre_mlp_layernorm(hidden))
            hidden = hidden + (out if bias is None else out + bias)
        cache.length = total
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

    def _sample(self, logits, params: SamplingParams, gens) -> list[int]:
        """The last stage samples; with pipeline stages, it broadcasts the tokens to the others."""
        tokens = sample_tokens(logits, params, gens) if self.model.post_process else None
        if self.dist.pp_size > 1:
            from megatron.core import parallel_state as ps

            from optune_nemo.distributed import broadcast_object

            tokens = broadcast_object(tokens, src=ps.get_pipeline_model_parallel_last_rank(),
                                      group=self.dist.pp_group)
        return tokens

    # ------------------------------------------------------------------ generation

    def _generate_batch(self, prompts: list[list[int]], keys: list[int], params: SamplingParams):
        B, n = len(prompts), params.n
        L = max(len(p) for p in prompts)
        if L + params.max_new_tokens > self.max_sequence_length:
            raise ValueError(f"model.seq_length: {L} prompt tokens + generation.max_new_tokens "
                             f"{params.max_new_tokens} exceed {self.max_sequence_length}")
        pad = torch.tensor([L - len(p) for p in prompts])
        tokens = torch.zeros(B, L, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, pad[i]:] = torch.tensor(p)
        positions = torch.arange(L)[None, :] - pad[:, None]
        cache = _Cache(len(self.model.decoder.layers), slots=L + params.max_new_tokens)
        cache.start_R = pad
        logits = self._forward(tokens, positions, cache)                 # prefill, once per prompt
        rows = torch.arange(B).repeat_interleave(n)                      # prompt i -> rows i*n..i*n+n-1
        cache.select(rows)
        if logits is not None:
            logits = logits.index_select(0, rows)
        gens = [sample_generator(params.seed, keys[i], j) for i in range(B) for j in range(n)]
        owner = list(range(B * n))                                       # row -> output slot
        out_tokens: list[list[int]] = [[] for _ in range(B * n)]
        reasons = ["length"] * (B * n)
        next_pos = (L - pad).repeat_interleave(n)
        stop = set(params.stop_token_ids)
        for step in range(params.max_new_tokens):
            new = self._sample(logits, params, gens)
            alive = []
            for r, tok in enumerate(new):
                out_tokens[owner[r]].append(tok)
                if tok in stop:
                    reasons[owner[r]] = "stop"
                elif step + 1 < params.max_new_tokens:
                    alive.append(r)
            if not alive:
                break
            if len(alive) < len(new):                                     # finished rows stop costing
                keep = torch.tensor(alive)
                cache.select(keep)
                next_pos = next_pos.index_select(0, keep)
                gens = [gens[r] for r in alive]
                owner = [owner[r] for r in alive]
                new = [new[r] for r in alive]
            logits = self._forward(torch.tensor(new)[:, None], next_pos[:, None], cache)
            next_pos = next_pos + 1
        samples = [Sample(t, self.decode(t), reasons[r]) for r, t in enumerate(out_tokens)]
        return [samples[i * n:(i + 1) * n] for i in range(B)]

    def _generate_local(self, prompts, keys, params) -> list[list[Sample]]:
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
        result: list = [None] * len(prompts)
        for k in range(0, len(order), self.batch_size):
            idx = order[k:k + self.batch_size]
            for i, samples in zip(idx, self._generate_batch([list(prompts[i]) for i in idx],
                                                            [keys[i] for i in idx], params)):
                result[i] = samples
        return result

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 keys: Sequence[int]) -> list[list[Sample]]:
        from optune_nemo.distributed import all_gather_object

        d, tic = self.dist, time.perf_counter()
        mine = list(range(d.dp_rank, len(prompts), d.dp_size))
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode(), cpu_compat_suspended():
                local = self._generate_local([prompts[i] for i in mine], [keys[i] for i in mine], params)
        finally:
            self.model.train(was_training)
        result: list = [None] * len(prompts)
        for rank, part in enumerate(all_gather_object(local, group=d.dp_group)):
            for i, samples in zip(range(rank, len(prompts), d.dp_size), part):
                result[i] = samples
        elapsed = time.perf_counter() - tic
        tokens = sum(s.num_tokens for group in result for s in group)
        self.last_stats = {"generated_tokens": tokens, "time_s": elapsed,
                           "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0}
        return result
