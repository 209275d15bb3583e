"""One way to derive seeds: `mix_seed(*parts)`.

Every random stream of a run (a prompt's samples at an iteration, random selection, the pair order of
an epoch, a layer's initial weights) is seeded from the run's `seed` mixed with what identifies the
stream. Hashing the parts (rather than `seed * prime + offset`) keeps distinct streams distinct for
every seed and is stable across processes, Python versions and machines.
"""

from __future__ import annotations

import hashlib

import torch


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed determined by `parts` (ints or strings), in order."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generator(*parts: int | str) -> torch.Generator:
    """A CPU generator seeded with `mix_seed(*parts)`."""
    return torch.Generator().manual_seed(mix_seed(*parts))
