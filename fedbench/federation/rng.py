"""Named random streams: every party and every use of randomness draws from its own generator."""

from __future__ import annotations

import hashlib
from typing import Any

import torch


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from the run seed and a stream name: streams never share random numbers."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(*parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))
