"""KV-cached batched generation on the policy's own weights (no copy), through an `IncrementalModel`
(the megatron one is `policy.inference.MegatronDecoder`): this module batches, samples and owns the
KV cache, and imports no model framework.

- Batches are formed by prompt length (sorted), so left padding is small; pads are masked and each
  row carries its own positions, so a row's numbers do not depend on its batch.
- Each prompt is prefilled ONCE; its cache rows are then repeated for its `n` samples.
- Rows that hit a stop token or max_new_tokens leave the batch (cache rows dropped) once a quarter of the
  batch has finished (compaction copies the cache; see COMPACT_WHEN_DEAD).
- Sampling: temperature, top_k, top_p, greedy at temperature 0, on the top CANDIDATES tokens of each row
  (exact: rows the candidates do not cover are redrawn over the full vocabulary); sample j of the request
  with key k draws from a generator seeded by (seed, k, j), so results do not depend on batch composition,
  data-parallel sharding or tensor-parallel size. Padded-vocabulary ids are never sampled.
- Tensor parallel: vocab-parallel logits are gathered ([rows, V] is small) and every TP rank samples
  identically. Data parallel: prompts are dealt over DP ranks and results all-gathered.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from optune_nemo.interfaces import Sample, SamplingParams
from optune_nemo.runtime.distributed import gather_shards, shard
from optune_nemo.runtime.seeding import generator

CANDIDATES = (64, 1024)
"""Tokens ranked per row before sampling, tried in turn. A language model's next-token distribution puts
nearly all of its mass on far fewer tokens, so sampling works on the top 64 candidates (a partial sort of
the vocabulary costs a fifth of a top-1024 on a CPU); rows the candidates do not cover are redone with more,
then over the fully sorted vocabulary: the draw stays exact."""


def sample_generator(seed: int, key: int, j: int) -> torch.Generator:
    """The CPU generator of sample `j` of the request with key `key`."""
    return generator(seed, key, j)


def draw_uniforms(generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One float64 uniform per row from the row's own generator (CPU): rows do not influence each other."""
    return torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])  # host: CPU generators


def sample_from_uniform(logits_RV: torch.Tensor, u_R: torch.Tensor, *, temperature: float, top_k: int,
                        top_p: float) -> torch.Tensor:
    """The token of each row that inverse-CDF sampling with uniform u gives, under temperature, then top-k,
    then nucleus (top-p) filtering: exact in distribution.

    Probabilities are taken under the full softmax (or the top-k one) and ranked (`topk`). Nucleus: a token
    is kept while the mass ranked above it is below top_p (the first always); the top candidates contain the
    whole nucleus when they hold at least top_p of the mass. Without a nucleus, a draw that falls beyond the
    candidates' mass is redone with more of them. Rows the candidates do not settle are redone with the next
    candidate count, and finally over the fully sorted vocabulary (the orders agree on the candidates)."""
    logits = logits_RV.float()
    if temperature != 1.0:
        logits = logits / temperature
    R, V = logits.shape
    u = u_R.to(device=logits.device, dtype=torch.float64)
    if top_k:                                   # the distribution is the softmax over the kept k tokens
        top, order = torch.topk(logits, min(top_k, V), dim=-1)
        return _draw(top.softmax(-1).double(), order, u, top_p)[0]
    probs = torch.softmax(logits, -1)           # one pass over the vocabulary for the normaliser
    tokens = torch.empty(R, dtype=torch.long, device=logits.device)
    rows = torch.arange(R, device=logits.device)
    for k in (*CANDIDATES, V):
        k = min(k, V)
        sub, sub_p = (logits, probs) if len(rows) == R else (logits[rows], probs[rows])   # no copy on pass 1
        order = torch.topk(sub, k, dim=-1).indices if k < V else torch.argsort(sub, -1, True)
        got, settled = _draw(sub_p.gather(1, order).double(), order, u[rows], top_p, complete=k == V)
        tokens[rows[settled]] = got[settled]
        rows = rows[~settled]
        if not len(rows):
            break
    return tokens


def _draw(p: torch.Tensor, order: torch.Tensor, u: torch.Tensor, top_p: float, *, complete: bool = True):
    """Inverse-CDF draws over ranked candidate probabilities `p` [R, k] (descending, token ids `order`):
    (tokens, settled). A row is settled when the candidates decide its draw exactly: they hold the whole
    nucleus (top_p < 1), or the draw falls within their mass, or they are the whole distribution."""
    cum = p.cumsum(-1)
    if top_p < 1.0:
        settled = cum[:, -1] >= top_p
        p = p * ((cum - p) < top_p)
        cum = p.cumsum(-1)
        target = u * cum[:, -1]
    else:
        target = u if not complete else u * cum[:, -1]
        settled = target < cum[:, -1]
    if complete:
        settled = torch.ones_like(settled)
    pos = torch.searchsorted(cum, target.unsqueeze(1)).squeeze(1).clamp(max=p.shape[1] - 1)
    # never beyond the last candidate with mass (rounding at the top of the cdf)
    pos = torch.minimum(pos, (p > 0).to(torch.int64).cumsum(-1).argmax(-1))
    return order.gather(1, pos.unsqueeze(1)).squeeze(1), settled


def sample_tokens(logits_RV: torch.Tensor, params: SamplingParams,
                  generators: Sequence[torch.Generator]) -> list[int]:
    """One token per row: argmax at temperature 0, else `sample_from_uniform` with one uniform from the
    row's own generator."""
    if params.temperature == 0:
        return logits_RV.argmax(-1).tolist()
    return sample_from_uniform(logits_RV, draw_uniforms(generators), temperature=params.temperature,
                               top_k=params.top_k, top_p=params.top_p).tolist()


DECODE_MODES = ("dynamic", "static", "graphs")

COMPACT_WHEN_DEAD = 4
"""Finished rows are dropped from the batch (and their cache rows with them) once they are at least 1/4 of
it: a compaction copies the whole cache, so doing it for every finished row would cost more than the
compute the finished rows waste in between (they are run, their samples ignored)."""


class KVCache:
    """Pre-allocated keys and values per layer, filled in place; `slots` = longest prompt + max_new_tokens,
    `length` of them written. Keys are stored transposed, [R, groups, dim, slots], so the scores q k^T of
    a decode step are one strided matrix product over the written slots (no per-step copy of the cache);
    values are [R, groups, slots, dim]. `start_R` is each row's first valid slot (its left padding).

    The model drives a step as `begin_step(S)`, `attend(li, q, k, v)` per layer, `end_step(S)`
    (`IncrementalModel.forward`); `write` and `length` stay for models that build their own mask."""

    def __init__(self, num_layers: int, slots: int, start_R: torch.Tensor):
        self.kt: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.slots, self.length = slots, 0
        self.start_R = start_R
        self._bias: torch.Tensor | None = None

    def write(self, li: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values of layer `li` ([R, groups, S, dim]); return all so far as
        (keys transposed [R, groups, dim, T], values [R, groups, T, dim])."""
        if self.kt[li] is None:
            R, G, _, D = k.shape
            self.kt[li] = k.new_empty(R, G, D, self.slots)
            self.v[li] = v.new_empty(R, G, self.slots, D)
        end = self.length + k.shape[2]
        self.kt[li][:, :, :, self.length:end] = k.transpose(-1, -2)
        self.v[li][:, :, self.length:end] = v
        return self.kt[li][:, :, :, :end], self.v[li][:, :, :end]

    def begin_step(self, S: int) -> None:
        """The mask of a step of S new tokens per row, once for every layer."""
        self._bias = attention_bias(self.start_R, self.length, S, dtype=torch.float32)

    def attend(self, li: int, q_RHSD: torch.Tensor, k_RGSD: torch.Tensor, v_RGSD: torch.Tensor) -> torch.Tensor:
        """Append this step's keys/values of layer `li` and return its attention output [R, heads, S, dim]."""
        keys_t, values = self.write(li, k_RGSD, v_RGSD)
        return gqa_attention(q_RHSD, keys_t, values, self._bias)

    def end_step(self, S: int) -> None:
        self.length += S

    def select(self, rows: torch.Tensor) -> None:
        """Keep / repeat rows (prefix sharing, finished rows leaving); only the written slots are copied."""
        n = self.length
        self.kt = [_select_rows(k, rows, (slice(None), slice(None), slice(None), slice(0, n))) for k in self.kt]
        self.v = [_select_rows(v, rows, (slice(None), slice(None), slice(0, n))) for v in self.v]
        self.start_R = self.start_R.index_select(0, rows)


def _select_rows(cache: torch.Tensor, rows: torch.Tensor, written: tuple) -> torch.Tensor:
    out = cache.new_empty(len(rows), *cache.shape[1:])
    torch.index_select(cache[written], 0, rows, out=out[written])
    return out


def attention_bias(start_R: torch.Tensor, past: int, S: int, *, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias [R, 1, S, past + S]: 0 where query s (slot past + s) may see key slot j, i.e.
    j is not the row's left padding (j >= start_R[r]) and not in the future (j <= past + s); -inf elsewhere.
    A query that is itself padding sees only its own slot (no empty softmax row, whose NaN would reach
    the values of real tokens through 0 * NaN)."""
    T = past + S
    slots = torch.arange(T, device=start_R.device)
    query = slots[past:]
    ok = (slots[None, None, :] >= start_R[:, None, None]) & (slots[None, None, :] <= query[None, :, None])
    ok |= slots[None, None, :] == query[None, :, None]
    return torch.zeros(ok.shape, dtype=dtype, device=start_R.device).masked_fill(~ok, float("-inf"))[:, None]


def gqa_attention(q_RHSD: torch.Tensor, kt_RGDT: torch.Tensor, v_RGTD: torch.Tensor,
                  bias_R1ST: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v with grouped-query attention (head h reads group h // (H / G)),
    without copying keys and values per head: the heads of a group are folded into the query rows of one
    batched matrix product (keys come transposed from the cache). Scores and softmax in float32 (megatron's
    attention_softmax_in_fp32)."""
    R, H, S, D = q_RHSD.shape
    G, T = kt_RGDT.shape[1], kt_RGDT.shape[3]
    rep = H // G
    q = q_RHSD.reshape(R, G, rep * S, D)
    scores = torch.matmul(q, kt_RGDT).view(R, G, rep, S, T).float()
    probs = torch.softmax(scores * D ** -0.5 + bias_R1ST[:, :, None], dim=-1).to(v_RGTD.dtype)
    return torch.matmul(probs.view(R, G, rep * S, T), v_RGTD).view(R, H, S, D)


ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
"""Row counts a static decode step is padded to (then multiples of the largest): one captured graph each."""
SLOT_BUCKET = 128
"""Slots of a static cache are a multiple of this (capped at the model's max_sequence_length)."""


def row_bucket(rows: int) -> int:
    """The smallest bucket that holds `rows` rows."""
    for b in ROW_BUCKETS:
        if rows <= b:
            return b
    return -(-rows // ROW_BUCKETS[-1]) * ROW_BUCKETS[-1]


def slot_bucket(slots: int, limit: int) -> int:
    return min(-(-slots // SLOT_BUCKET) * SLOT_BUCKET, max(limit, slots))


class StaticKVCache:
    """A KV cache of fixed shape for decode steps whose every tensor keeps its address and shape from step
    to step (what a CUDA graph replays): keys and values [rows, groups, slots, dim] per layer, `start_R`
    [rows] each row's first valid slot, `pos` [1] the slot the next token is written to, a device tensor
    (never a Python int, which a graph would freeze). Every step attends over all `slots` with SDPA, the
    mask hiding the padding and the slots not written yet. Rows never leave: finished rows and bucket
    padding keep running, their tokens ignored (rows do not interact)."""

    def __init__(self, num_layers: int, rows: int, slots: int, *, groups: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (rows, groups, slots, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.rows, self.slots = rows, slots
        self.start_R = torch.zeros(rows, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self._slots = torch.arange(slots, device=device)
        self._mask: torch.Tensor | None = None

    def load(self, prefix: KVCache, rows: torch.Tensor) -> None:
        """Start from a prefilled dynamic cache: row i of this cache is row rows[i] of `prefix`; rows past
        len(rows) (bucket padding) see only slot 0 onwards of zeros."""
        R, n = len(rows), prefix.length
        for li in range(len(self.k)):
            self.k[li][:R, :, :n] = prefix.kt[li][:, :, :, :n].index_select(0, rows).transpose(-1, -2)
            self.v[li][:R, :, :n] = prefix.v[li][:, :, :n].index_select(0, rows)
        self.start_R.zero_()
        self.start_R[:R] = prefix.start_R.index_select(0, rows)
        self.pos.fill_(n)

    def begin_step(self, S: int) -> None:
        query = self.pos + torch.arange(S, device=self.pos.device)                        # [S]
        ok = (self._slots[None, None, :] >= self.start_R[:, None, None]) & \
            (self._slots[None, None, :] <= query[None, :, None])
        self._mask = (ok | (self._slots[None, None, :] == query[None, :, None]))[:, None]   # [R, 1, S, slots]

    def attend(self, li: int, q_RHSD: torch.Tensor, k_RGSD: torch.Tensor, v_RGSD: torch.Tensor) -> torch.Tensor:
        index = self.pos + torch.arange(k_RGSD.shape[2], device=self.pos.device)
        self.k[li].index_copy_(2, index, k_RGSD.to(self.k[li].dtype))
        self.v[li].index_copy_(2, index, v_RGSD.to(self.v[li].dtype))
        return torch.nn.functional.scaled_dot_product_attention(
            q_RHSD, self.k[li], self.v[li], attn_mask=self._mask, enable_gqa=True)

    def end_step(self, S: int) -> None:
        self.pos.add_(S)


class StaticDecoder:
    """Decode steps on `StaticKVCache`s, one per (row bucket, slot bucket), each step captured once as a
    CUDA graph when `graphs` (then a step is one graph launch instead of hundreds of kernel launches: what
    bounds a small model's decoding on a GPU), run eagerly otherwise (CPU; the same code path).

    Static inputs per bucket: tokens and positions [rows, 1]; the output is the captured logits tensor.
    Graphs read the weights at their addresses: `release()` (end_generation) drops them before training,
    which may move parameters, and frees the caches' memory."""

    def __init__(self, model, *, graphs: bool):
        self.model, self.graphs = model, graphs
        self.buckets: dict[tuple[int, int], dict] = {}
        self._pool = None

    def release(self) -> None:
        self.buckets.clear()
        self._pool = None

    def prepare(self, prefix: KVCache, rows: torch.Tensor, slots: int) -> dict:
        """The bucket for len(rows) rows and `slots` slots, its cache loaded from `prefix`."""
        key = (row_bucket(len(rows)), slot_bucket(slots, self.model.max_sequence_length))
        if key not in self.buckets:
            k = prefix.kt[0]
            cache = StaticKVCache(self.model.num_layers, key[0], key[1], groups=k.shape[1], head_dim=k.shape[2],
                                  dtype=k.dtype, device=k.device)
            self.buckets[key] = {"cache": cache, "graph": None, "logits": None,
                                 "tokens": torch.zeros(key[0], 1, dtype=torch.long, device=k.device),
                                 "positions": torch.zeros(key[0], 1, dtype=torch.long, device=k.device)}
        bucket = self.buckets[key]
        bucket["cache"].load(prefix, rows)
        return bucket

    def step(self, bucket: dict, tokens_R: torch.Tensor, positions_R: torch.Tensor) -> torch.Tensor | None:
        """Logits [len(tokens_R), V] of one decode step (None off the last pipeline stage)."""
        R = len(tokens_R)
        bucket["tokens"][:R, 0] = tokens_R
        bucket["positions"][:R, 0] = positions_R
        if not self.graphs:
            logits = self.model.forward(bucket["tokens"], bucket["positions"], bucket["cache"])
            return None if logits is None else logits[:R]
        if bucket["graph"] is None:
            self._capture(bucket)
        bucket["graph"].replay()
        logits = bucket["logits"]
        return None if logits is None else logits[:R].clone()   # the next replay overwrites it

    def _capture(self, bucket: dict) -> None:
        cache, args = bucket["cache"], (bucket["tokens"], bucket["positions"], bucket["cache"])
        saved = cache.pos.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):          # warm-up (lazy tables, cuBLAS workspaces) off the capture
            for _ in range(2):
                self.model.forward(*args)
                cache.pos.copy_(saved)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # one memory pool for every bucket's intermediates
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):     # records, runs nothing: pos is unchanged
            bucket["logits"] = self.model.forward(*args)
        bucket["graph"] = graph


class IncrementalModel(Protocol):
    """What the engine needs of a model: a KV-cached forward with per-row positions
    (`policy.inference.MegatronDecoder` on the training weights)."""

    num_layers: int
    vocab_size: int
    max_sequence_length: int
    is_last_stage: bool
    device: torch.device
    drives_cache: bool
    """True when `forward` follows the cache contract below (begin_step / attend / end_step); a static cache
    and CUDA graphs need it (`generation.torch_decode_mode`)."""

    def forward(self, tokens_RS: torch.Tensor, positions_RS: torch.Tensor, cache) -> torch.Tensor | None:
        """Last-position logits [R, vocab_size] float32 on the last pipeline stage, None elsewhere. The cache
        (`KVCache` or `StaticKVCache`) owns the keys, values and mask: the forward calls
        `cache.begin_step(S)`, then per layer `ctx_RHSD = cache.attend(li, q_RHSD, k_RGSD, v_RGSD)` (rotary
        already applied), then `cache.end_step(S)`, and makes no Python decision on the cache's content
        (a CUDA graph replays it)."""
        ...

    def from_last_stage(self, obj):
        """The last pipeline stage's `obj` on every stage."""
        ...

    def generating(self):
        """Context manager: eval mode and no autograd for a generate() call."""
        ...


class TorchEngine:
    """`interfaces.GenerationEngine` on an `IncrementalModel`; data-parallel over `dist`'s DP group."""

    def __init__(self, model: IncrementalModel, *, decode: Callable[[list[int]], str], dist, batch_size: int,
                 decode_mode: str = "dynamic"):
        """decode_mode: `dynamic` (a cache that grows with the batch, finished rows compacted away: best on a
        CPU), `static` (fixed-shape `StaticKVCache` buckets, run eagerly) or `graphs` (static, each decode
        step captured as a CUDA graph; `generation.cuda_graphs`)."""
        if decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode: must be one of {DECODE_MODES} (got {decode_mode!r})")
        self.model, self.decode, self.dist, self.batch_size = model, decode, dist, batch_size
        self.static = None if decode_mode == "dynamic" else StaticDecoder(model, graphs=decode_mode == "graphs")
        self.forward_calls = 0   # model evaluations (graph replays included), for tests

    def begin_generation(self) -> None:
        """Nothing to do: the engine runs on the training weights themselves."""

    def end_generation(self) -> None:
        """Training follows: drop the static caches and captured graphs (they hold memory and the weights'
        addresses); the dynamic KV cache lives only inside a generate() call."""
        if self.static is not None:
            self.static.release()

    def _forward(self, tokens_RS, positions_RS, cache):
        self.forward_calls += 1
        return self.model.forward(tokens_RS, positions_RS, cache)

    def _sample(self, logits, params: SamplingParams, gens) -> list[int]:
        """The last stage samples; with pipeline stages, it shares the tokens with the others."""
        tokens = sample_tokens(logits, params, gens) if self.model.is_last_stage else None
        return self.model.from_last_stage(tokens)

    # ------------------------------------------------------------------ generation

    def _generate_batch(self, prompts: list[list[int]], keys: list[int], params: SamplingParams):
        B, n, dev = len(prompts), params.n, self.model.device
        L = max(len(p) for p in prompts)
        if L + params.max_new_tokens > self.model.max_sequence_length:
            raise ValueError(f"model.seq_length: {L} prompt tokens + generation.max_new_tokens "
                             f"{params.max_new_tokens} exceed {self.model.max_sequence_length}")
        pad = torch.tensor([L - len(p) for p in prompts], device=dev)
        tokens = torch.tensor([[0] * (L - len(p)) + list(p) for p in prompts], dtype=torch.long, device=dev)
        positions = torch.arange(L, device=dev)[None, :] - pad[:, None]
        cache = KVCache(self.model.num_layers, slots=L + params.max_new_tokens, start_R=pad)
        logits = self._forward(tokens, positions, cache)                 # prefill, once per prompt
        rows = torch.arange(B, device=dev).repeat_interleave(n)          # prompt i -> rows i*n..i*n+n-1
        bucket = None
        if self.static is not None:
            bucket = self.static.prepare(cache, rows, L + params.max_new_tokens)
        else:
            cache.select(rows)
        if logits is not None:
            logits = logits.index_select(0, rows)
        gens = [sample_generator(params.seed, keys[i], j) for i in range(B) for j in range(n)]
        owner = list(range(B * n))                                       # row -> output slot
        out_tokens: list[list[int]] = [[] for _ in range(B * n)]
        reasons = ["length"] * (B * n)
        next_pos = (L - pad).repeat_interleave(n)
        done = [False] * (B * n)                                         # per row of the current batch
        stop = set(params.stop_token_ids)
        for step in range(params.max_new_tokens):
            new = self._sample(logits, params, gens)
            for r, tok in enumerate(new):
                if done[r]:
                    continue
                out_tokens[owner[r]].append(tok)
                if tok in stop:
                    reasons[owner[r]], done[r] = "stop", True
            if all(done) or step + 1 == params.max_new_tokens:
                break
            if bucket is None and sum(done) * COMPACT_WHEN_DEAD >= len(done):   # finished rows stop costing
                alive = [r for r, d in enumerate(done) if not d]
                keep = torch.tensor(alive, device=dev)
                cache.select(keep)
                next_pos = next_pos.index_select(0, keep)
                gens, owner = [gens[r] for r in alive], [owner[r] for r in alive]
                new, done = [new[r] for r in alive], [False] * len(alive)
            if bucket is None:
                logits = self._forward(torch.tensor(new, device=dev)[:, None], next_pos[:, None], cache)
            else:                                                        # rows never leave a static cache
                self.forward_calls += 1
                logits = self.static.step(bucket, torch.tensor(new, device=dev), next_pos)
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
        d = self.dist
        mine = shard(len(prompts), d.dp_rank, d.dp_size)
        with self.model.generating():
            local = self._generate_local([prompts[i] for i in mine], [keys[i] for i in mine], params)
        return gather_shards(local, len(prompts), group=d.dp_group)
