"""Token log-probabilities from vocab-parallel logits.

Logits stay sharded over the vocabulary on tensor-parallel ranks; the log-softmax is formed with
all-reduces of the max and the sum (megatron's vocab_parallel_cross_entropy), never gathering the
vocabulary on one rank. Entries of the padded vocabulary (ids >= the tokenizer's vocab size) are masked
out of the softmax, so the numbers equal those of the unpadded model. The batches these logits come from
are packed and prefix-shared (megatron/packing.py); only positions that predict a response token reach
the LM head.
"""

from __future__ import annotations

import torch


def vocab_parallel_token_logprobs(logits_BTV: torch.Tensor, labels_BT: torch.Tensor, *,
                                  real_vocab_size: int, tp_rank: int) -> torch.Tensor:
    """log p(label) per position [B, T] from this rank's vocabulary shard of the logits, computed in float32.
    Differentiable; every tensor-parallel rank gets the full result."""
    from megatron.core import tensor_parallel

    shard = logits_BTV.shape[-1]
    logits = logits_BTV.float()
    # whether this shard holds padded entries is known from the shapes: no device-to-host sync per micro-batch
    first_padded = real_vocab_size - tp_rank * shard
    if first_padded < shard:
        padded = torch.arange(shard, device=logits.device) >= first_padded
        logits = logits.masked_fill(padded, float("-inf"))
    # vocab_parallel_cross_entropy expects [S, B, V]; it returns -log p(target)
    nll = tensor_parallel.vocab_parallel_cross_entropy(logits.transpose(0, 1).contiguous(),
                                                       labels_BT.transpose(0, 1).contiguous())
    return -nll.transpose(0, 1)
