"""KV-cached batched generation on the policy's own weights (no copy), through an `IncrementalModel`
(the megatron one is `policy.inference.MegatronDecoder`): this module batches, samples and owns the
KV cache, and imports no model framework.

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

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from optune_nemo.distributed import gather_shards, shard
from optune_nemo.interfaces import Sample, SamplingParams
from optune_nemo.seeding import generator


def sample_generator(seed: int, key: int, j: int) -> torch.Generator:
    """The CPU generator of sample `j` of the request with key `key`."""
    return generator(seed, key, j)


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


class KVCache:
    """Pre-allocated keys/values per layer, [R, groups, slots, dim], `slots` = longest prompt +
    max_new_tokens, filled in place; `length` slots are written. `start_R` is each row's first valid
    slot (its left padding)."""

    def __init__(self, num_layers: int, slots: int, start_R: torch.Tensor):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.slots, self.length = slots, 0
        self.start_R = start_R

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
                keep = torch.tensor(alive, device=dev)
                cache.select(keep)
                next_pos = next_pos.index_select(0, keep)
                gens = [gens[r] for r in alive]
                owner = [owner[r] for r in alive]
                new = [new[r] for r in alive]
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
