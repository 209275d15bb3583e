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

from optune_nemo.distributed import gather_shards, shard
from optune_nemo.interfaces import Sample, SamplingParams
from optune_nemo.seeding import generator

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


COMPACT_WHEN_DEAD = 4
"""Finished rows are dropped from the batch (and their cache rows with them) once they are at least 1/4 of
it: a compaction copies the whole cache, so doing it for every finished row would cost more than the
compute the finished rows waste in between (they are run, their samples ignored)."""


class KVCache:
    """Pre-allocated keys and values per layer, filled in place; `slots` = longest prompt + max_new_tokens,
    `length` of them written. Keys are stored transposed, [R, groups, dim, slots], so the scores q k^T of
    a decode step are one strided matrix product over the written slots (no per-step copy of the cache);
    values are [R, groups, slots, dim]. `start_R` is each row's first valid slot (its left padding)."""

    def __init__(self, num_layers: int, slots: int, start_R: torch.Tensor):
        self.kt: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.slots, self.length = slots, 0
        self.start_R = start_R

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


class IncrementalModel(Protocol):
    """What the engine needs of a model: a KV-cached forward with per-row positions
    (`policy.inference.MegatronDecoder` on the training weights)."""

    num_layers: int
    vocab_size: int
    max_sequence_length: int
    is_last_stage: bool
    device: torch.device

    def forward(self, tokens_RS: torch.Tensor, positions_RS: torch.Tensor, cache: KVCache) -> torch.Tensor | None:
        """Last-position logits [R, vocab_size] float32 on the last pipeline stage, None elsewhere."""
        ...

    def from_last_stage(self, obj):
        """The last pipeline stage's `obj` on every stage."""
        ...

    def generating(self):
        """Context manager: eval mode and no autograd for a generate() call."""
        ...


class TorchEngine:
    """`interfaces.GenerationEngine` on an `IncrementalModel`; data-parallel over `dist`'s DP group."""

    def __init__(self, model: IncrementalModel, *, decode: Callable[[list[int]], str], dist, batch_size: int):
        self.model, self.decode, self.dist, self.batch_size = model, decode, dist, batch_size
        self.forward_calls = 0   # model evaluations, for tests

    def begin_generation(self) -> None:
        """Nothing to do: the engine runs on the training weights themselves."""

    def end_generation(self) -> None:
        """Nothing to release: the KV cache lives only inside a generate() call."""

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
            if sum(done) * COMPACT_WHEN_DEAD >= len(done):                 # finished rows stop costing
                alive = [r for r, d in enumerate(done) if not d]
                keep = torch.tensor(alive, device=dev)
                cache.select(keep)
                next_pos = next_pos.index_select(0, keep)
                gens, owner = [gens[r] for r in alive], [owner[r] for r in alive]
                new, done = [new[r] for r in alive], [False] * len(alive)
            logits = self._forward(torch.tensor(new, device=dev)[:, None], next_pos[:, None], cache)
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
