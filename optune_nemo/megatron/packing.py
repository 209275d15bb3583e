"""Packed, prefix-shared batches for response log-probabilities.

A *group* is one prompt with the responses that share it: a preference pair is (prompt, [chosen,
rejected]); a plain sequence is (prompt, [response]). A micro-batch is one row: its groups laid end to
end, each group as [prompt | response 1 | response 2 | ...], so
  - the prompt of a pair is run ONCE for both of its responses (prefix sharing),
  - no position is padding except, optionally, a tail that rounds the row length up,
  - and only the positions that predict a response token go through the LM head (`label_index`).
An attention mask keeps the pieces apart: a token sees the earlier tokens of its own group's prompt and
of its own response, nothing else; positions restart after the prompt for every response, so every
response token sees exactly what it would see in the unshared sequence `prompt + response`.

Worked example, groups ([5, 6], [[7, 8], [9]]) and ([4], [[3]]), padded to 8:

    index     0  1  2  3  4  5  6  7
    token     5  6  7  8  9  4  3  pad
    position  0  1  2  3  2  0  1  0
    group     0  0  0  0  0  1  1  -1
    branch    0  0  1  1  2  0  1  -1        (0: the prompt, k: response k)

    response 0 = [7, 8]: log p(7 | 5 6) at index 1, log p(8 | 5 6 7) at index 2
    response 1 = [9]:    log p(9 | 5 6) at index 1 (the prompt's last position serves both responses)
    response 2 = [3]:    log p(3 | 4) at index 5
    label_index = [1, 2, 1, 5], labels = [7, 8, 9, 3], output = [0, 0, 1, 2]

`attend[i, j]` (token i may see token j) = same group, j <= i, and (j in the prompt or same branch);
padding sees itself only. The batch carries the per-token ids (`SegmentIds`: group, branch), not an S x S
mask: the core attention (megatron/attention.py) builds its mask from them on the device, once per
micro-batch. `PackedBatch.mask_B1SS` is megatron's dense form (True = masked), built on demand.

Which pairs share a row is `epoch_layout`'s choice (pure, no communication): a fixed number of pairs
(`train.micro_batch_size`), or, with `train.micro_batch_tokens` > 0, as many as fill a token budget.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

Group = tuple[Sequence[int], Sequence[Sequence[int]]]


def attend(group_q, branch_q, idx_q, group_k, branch_k, idx_k):
    """May query token q see key token k (elementwise; broadcasts, and serves as flex's mask_mod body).
    The packed layout's rule: same group, not in the future, the key in the prompt or in the query's own
    branch; a padding query (group -1) sees only itself, so no softmax row is empty."""
    return ((group_q == group_k) & (idx_k <= idx_q) & ((branch_k == 0) | (branch_k == branch_q))
            & ((group_q >= 0) | (idx_q == idx_k)))


@dataclass(eq=False)
class SegmentIds:
    """Per-token segment ids of packed rows (the layout above): `group_BS` the pair / group a token belongs
    to (-1: padding), `branch_BS` 0 for the prompt, k for response k (-1: padding). Passed to the decoder as
    its `attention_mask`; the masks derived from it are built on the ids' device, once, and cached here."""

    group_BS: torch.Tensor
    branch_BS: torch.Tensor
    _cache: dict = field(default_factory=dict, repr=False)

    def to(self, device) -> SegmentIds:
        return SegmentIds(self.group_BS.to(device, non_blocking=True), self.branch_BS.to(device, non_blocking=True))

    def allowed_B1SS(self) -> torch.Tensor:
        """[B, 1, S, S] bool, True = may attend (SDPA's convention)."""
        if "dense" not in self._cache:
            g, b = self.group_BS, self.branch_BS
            idx = torch.arange(g.shape[1], device=g.device)
            self._cache["dense"] = attend(g[:, :, None], b[:, :, None], idx[:, None],
                                          g[:, None, :], b[:, None, :], idx[None, :])[:, None]
        return self._cache["dense"]

    def masked_B1SS(self) -> torch.Tensor:
        """[B, 1, S, S] bool, True = may NOT attend (megatron's convention, for its DotProductAttention)."""
        return ~self.allowed_B1SS()

    def block_mask(self):
        """FlexAttention's BlockMask of the rows (built on the ids' device; blocks no token pair of which
        may attend are skipped by the kernel)."""
        if "block" not in self._cache:
            from torch.nn.attention.flex_attention import create_block_mask

            g, b = self.group_BS, self.branch_BS

            def mask_mod(batch, head, q, k):
                return attend(g[batch, q], b[batch, q], q, g[batch, k], b[batch, k], k)

            S = g.shape[1]
            self._cache["block"] = create_block_mask(mask_mod, g.shape[0], None, S, S, device=g.device)
        return self._cache["block"]


@dataclass
class PackedBatch:
    tokens_BS: torch.Tensor          # [1, S] int64
    positions_BS: torch.Tensor       # [1, S] int64, restarting after the prompt for every response
    segments: SegmentIds             # group / branch id of every token [1, S] (the attention's mask, as ids)
    label_index_N: torch.Tensor      # [N] int64: the position whose logits predict label n
    labels_N: torch.Tensor           # [N] int64: the response token predicted there
    output_N: torch.Tensor           # [N] int64: which response (in input order) label n belongs to
    num_outputs: int

    @property
    def length(self) -> int:
        return self.tokens_BS.shape[1]

    @property
    def mask_B1SS(self) -> torch.Tensor:
        """[1, 1, S, S] bool, True = may not attend (megatron's convention), built from the ids on their device."""
        return self.segments.masked_B1SS()

    def to(self, device) -> PackedBatch:
        # non_blocking: host-to-device copies queue behind the running kernels instead of waiting for them
        to = functools.partial(torch.Tensor.to, device=device, non_blocking=True)
        return PackedBatch(to(self.tokens_BS), to(self.positions_BS), self.segments.to(device),
                           to(self.label_index_N), to(self.labels_N), to(self.output_N), self.num_outputs)


def group_length(group: Group) -> int:
    prompt, responses = group
    return len(prompt) + sum(len(r) for r in responses)


def pack_groups(groups: Sequence[Group], *, pad_id: int, length: int | None = None,
                multiple_of: int = 1) -> PackedBatch:
    """One row holding every group (layout in the module docstring). The row is `length` tokens long (at
    least the groups' total), rounded up to a multiple of `multiple_of` (FP8 GEMMs want multiples of 16)."""
    tokens, positions, group_of, branch_of = [], [], [], []
    label_index, labels, output = [], [], []
    out = 0
    for g, (prompt, responses) in enumerate(groups):
        assert len(prompt) >= 1, "a prompt needs at least one token to predict the first response token"
        start = len(tokens)
        tokens += list(prompt)
        positions += range(len(prompt))
        group_of += [g] * len(prompt)
        branch_of += [0] * len(prompt)
        last_prompt = start + len(prompt) - 1
        for b, response in enumerate(responses, 1):
            first = len(tokens)
            tokens += list(response)
            positions += range(len(prompt), len(prompt) + len(response))
            group_of += [g] * len(response)
            branch_of += [b] * len(response)
            label_index += [last_prompt] + list(range(first, first + len(response) - 1))
            labels += list(response)
            output += [out] * len(response)
            out += 1
    total = len(tokens)
    S = max(total, length or 0)
    S = -(-S // multiple_of) * multiple_of
    pad = S - total
    tokens += [pad_id] * pad
    positions += [0] * pad
    group_of += [-1] * pad
    branch_of += [-1] * pad
    segments = SegmentIds(torch.tensor([group_of], dtype=torch.int32), torch.tensor([branch_of], dtype=torch.int32))
    return PackedBatch(torch.tensor([tokens]), torch.tensor([positions]), segments,
                       torch.tensor(label_index, dtype=torch.long), torch.tensor(labels, dtype=torch.long),
                       torch.tensor(output, dtype=torch.long), out)


def sum_per_output(token_logps_N: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """[num_outputs] sums of the per-label log-probs, per response (differentiable)."""
    out = token_logps_N.new_zeros(batch.num_outputs)
    return out.index_add(0, batch.output_N, token_logps_N)


def split_by_tokens(indices: Sequence[int], lengths: Sequence[int], budget: int) -> list[list[int]]:
    """`indices` cut, in their order, into micro-batches filled greedily up to `budget` packed tokens
    (`lengths[i]`: the `group_length` of pair i): a micro-batch takes the next pair while its total stays
    within the budget; a pair longer than the budget alone forms its own micro-batch."""
    out: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in indices:
        if current and used + lengths[i] > budget:
            out.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        out.append(current)
    return out


def epoch_layout(order: Sequence[int], lengths: Sequence[int], *, global_batch_size: int, micro_batch_size: int,
                 micro_batch_tokens: int, dp_rank: int, dp_size: int) -> list[list[list[int]]]:
    """Data-parallel rank `dp_rank`'s micro-batches of pair indices, per optimizer step of one epoch whose
    pairs come in `order`: cut into global batches of `global_batch_size`, each dealt round-robin over the
    `dp_size` ranks (rank r takes positions r, r + dp_size, ...), each rank's share cut into micro-batches
    - of `micro_batch_size` pairs when `micro_batch_tokens` is 0;
    - else in order, greedily up to `micro_batch_tokens` packed tokens (`split_by_tokens`; `lengths[i]` is
      pair i's packed length), whatever the number of pairs.
    Every rank runs the same number of micro-batches in a step (megatron's schedule and the collectives
    need it): a rank whose share runs out gets empty ones (the policy runs a masked dummy pair there).
    Every rank has the whole batch, so each computes every rank's split, the same, without communication."""
    steps = []
    for s in range(math.ceil(len(order) / global_batch_size)):
        idx = list(order[s * global_batch_size:(s + 1) * global_batch_size])
        if micro_batch_tokens > 0:
            splits = [split_by_tokens(idx[r::dp_size], lengths, micro_batch_tokens) for r in range(dp_size)]
            mine = splits[dp_rank]
            steps.append(mine + [[] for _ in range(max(map(len, splits)) - len(mine))])
        else:
            mine = idx[dp_rank::dp_size]
            num_mb = math.ceil(math.ceil(len(idx) / dp_size) / micro_batch_size)
            steps.append([mine[k * micro_batch_size:(k + 1) * micro_batch_size] for k in range(num_mb)])
    return steps
