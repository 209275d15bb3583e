"""Response-token log-probabilities from vocab-parallel logits.

Batch layout (right padding; one row per sequence = prompt + response):

    prompt [5, 6, 7], response [8, 9], padded to T = 6 with pad id 0:
        tokens_BT     = [5, 6, 7, 8, 9, 0]
        labels_BT     = [6, 7, 8, 9, 0, 0]      next token at each position (pad at the end)
        loss_mask_BT  = [0, 0, 1, 1, 0, 0]      1 where the label is a response token
    sum_t loss_mask * log p(labels_t | tokens_<=t) = log p(8 | 5 6 7) + log p(9 | 5 6 7 8)

Right padding needs no attention mask: the causal mask already keeps padding (at the end) out of
every earlier position. Logits stay sharded over the vocabulary on tensor-parallel ranks; the
log-softmax is formed with all-reduces of the max and the sum (megatron's
vocab_parallel_cross_entropy), never gathering the vocabulary on one rank. Entries of the padded
vocabulary (ids >= the tokenizer's vocab size) are masked out of the softmax, so the numbers equal
those of the unpadded model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class SequenceBatch:
    tokens_BT: torch.Tensor        # int64
    position_ids_BT: torch.Tensor  # int64
    labels_BT: torch.Tensor        # int64
    loss_mask_BT: torch.Tensor     # float32

    def to(self, device) -> SequenceBatch:
        return SequenceBatch(*(t.to(device) for t in (self.tokens_BT, self.position_ids_BT,
                                                      self.labels_BT, self.loss_mask_BT)))


def make_sequence_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *,
                        pad_id: int, length: int | None = None) -> SequenceBatch:
    """Right-padded batch of prompt+response rows (layout in the module docstring)."""
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    T = length if length is not None else max(len(s) for s in seqs)
    B = len(seqs)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.float32)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        assert len(s) <= T, f"sequence of {len(s)} tokens exceeds the batch length {T}"
        tokens[i, :len(s)] = torch.tensor(s)
        labels[i, :len(s) - 1] = torch.tensor(s[1:])
        mask[i, max(len(p) - 1, 0):len(s) - 1] = 1.0
    positions = torch.arange(T, dtype=torch.long).unsqueeze(0).expand(B, T).contiguous()
    return SequenceBatch(tokens, positions, labels, mask)


def vocab_parallel_token_logprobs(logits_BTV: torch.Tensor, labels_BT: torch.Tensor, *,
                                  real_vocab_size: int, tp_rank: int) -> torch.Tensor:
    """log p(label) per position [B, T] from this rank's vocabulary shard of the logits.
    Differentiable; every tensor-parallel rank gets the full result."""
    from megatron.core import tensor_parallel

    shard = logits_BTV.shape[-1]
    vocab_ids = torch.arange(tp_rank * shard, (tp_rank + 1) * shard, device=logits_BTV.device)
    logits = logits_BTV.float()
    if (vocab_ids >= real_vocab_size).any():
        logits = logits.masked_fill(vocab_ids >= real_vocab_size, float("-inf"))
    # vocab_parallel_cross_entropy expects [S, B, V]; it returns -log p(target)
    nll = tensor_parallel.vocab_parallel_cross_entropy(logits.transpose(0, 1).contiguous(),
                                                       labels_BT.transpose(0, 1).contiguous())
    return -nll.transpose(0, 1)


def sequence_logprobs_from_logits(logits_BTV, batch: SequenceBatch, *, real_vocab_size: int,
                                  tp_rank: int) -> torch.Tensor:
    """[B] sum of response-token log-probs."""
    token_logps = vocab_parallel_token_logprobs(logits_BTV, batch.labels_BT,
                                                real_vocab_size=real_vocab_size, tp_rank=tp_rank)
    return (token_logps * batch.loss_mask_BT).sum(dim=-1)
