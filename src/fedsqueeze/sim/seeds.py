"""Seed tree: every random draw of a run derives from ``(run seed, purpose, round, client)``.

Deriving seeds instead of carrying RNG state means a run resumed at round t draws exactly what an
uninterrupted run draws, and results do not depend on the order clients are processed in.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive_seed(*keys: int | str) -> int:
    """A 63-bit seed from any sequence of ints/strings (BLAKE2b; stable across platforms)."""
    text = "/".join(str(k) for k in keys).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def np_rng(*keys: int | str) -> np.random.Generator:
    """A NumPy generator for the given purpose."""
    return np.random.default_rng(derive_seed(*keys))


def torch_rng(*keys: int | str) -> torch.Generator:
    """A torch CPU generator for the given purpose."""
    return torch.Generator().manual_seed(derive_seed(*keys))
