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

`attend[i, j]` (token i may see token j) = same group, j <= i, and (j in the prompt or same branch).
Megatron's attention mask is the complement (True = masked).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Group = tuple[Sequence[int], Sequence[Sequence[int]]]


@dataclass
class PackedBatch:
    tokens_BS: torch.Tensor          # [1, S] int64
    positions_BS: torch.Tensor       # [1, S] int64, restarting after the prompt for every response
    mask_B1SS: torch.Tensor          # [1, 1, S, S] bool, True = may not attend (megatron's convention)
    label_index_N: torch.Tensor      # [N] int64: the position whose logits predict label n
    labels_N: torch.Tensor           # [N] int64: the response token predicted there
    output_N: torch.Tensor           # [N] int64: which response (in input order) label n belongs to
    num_outputs: int

    @property
    def length(self) -> int:
        return self.tokens_BS.shape[1]

    def to(self, device) -> PackedBatch:
        return PackedBatch(self.tokens_BS.to(device), self.positions_BS.to(device), self.mask_B1SS.to(device),
                           self.label_index_N.to(device), self.labels_N.to(device), self.output_N.to(device),
                           self.num_outputs)


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
    grp, br = torch.tensor(group_of), torch.tensor(branch_of)
    idx = torch.arange(S)
    attend = ((grp[:, None] == grp[None, :]) & (grp[:, None] >= 0) & (idx[None, :] <= idx[:, None])
              & ((br[None, :] == 0) | (br[None, :] == br[:, None])))
    attend |= torch.eye(S, dtype=torch.bool)          # padding sees itself: no empty softmax row
    return PackedBatch(torch.tensor([tokens]), torch.tensor([positions]), (~attend)[None, None],
                       torch.tensor(label_index, dtype=torch.long), torch.tensor(labels, dtype=torch.long),
                       torch.tensor(output, dtype=torch.long), out)


def sum_per_output(token_logps_N: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """[num_outputs] sums of the per-label log-probs, per response (differentiable)."""
    out = token_logps_N.new_zeros(batch.num_outputs)
    return out.index_add(0, batch.output_N, token_logps_N)
