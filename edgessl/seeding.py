"""Counter-based seeding shared by training and evaluation: a random stream is a pure function of integers
(seed, epoch, step, class, purpose, ...), identical on every machine and independent of call order."""

from __future__ import annotations

import hashlib

import torch


def stable_seed(*parts: int) -> int:
    """A 63-bit seed from a hash of integers."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def keyed_generator(*parts: int) -> torch.Generator:
    """A torch.Generator seeded by stable_seed(*parts)."""
    return torch.Generator().manual_seed(stable_seed(*parts))
