"""Coding of boolean masks close to their entropy.

The mask is cut into groups of M consecutive entries along the kernel's input dimension (axis 0, the direction
N:M patterns run in), and each group's M bits become one symbol in [0, 2**M), entropy-coded against the groups'
histogram (`entropy.encode`). M = 1 is plain Bernoulli coding, h2(s) bits per entry for an unstructured mask at
sparsity s; with M = 4 an N:M pattern costs about log2(C(M, N)) / M bits per entry (0.65 for 2:4), because only
C(M, N) of the 2**M symbols occur. `encode` tries M in (1, 4, 8, 16) where M divides the input dimension and keeps
the smallest result, so unstructured masks get Bernoulli coding and N:M masks get pattern coding, without being
told which is which.

Layout: u8 M, then the stream.
"""

from __future__ import annotations

import struct

import numpy as np

from research import errors
from research.coding import entropy

GROUPS = (1, 4, 8, 16)


def _symbols(mask: np.ndarray, m: int) -> np.ndarray:
    """(in // m, *rest) groups of m bits along axis 0, as integers (bit j = entry j of the group)."""
    x = mask.reshape(mask.shape[0] // m, m, -1).transpose(0, 2, 1)  # (groups, rest, m)
    weights = (1 << np.arange(m, dtype=np.int64))[None, None, :]
    return (x.astype(np.int64) * weights).sum(-1).ravel()


def encode(mask) -> bytes:
    """The smallest of the group codings of a boolean mask (any shape, at least 1-D)."""
    mask = np.asarray(mask, bool)
    if mask.ndim == 0:
        mask = mask.reshape(1)
    best = None
    for m in GROUPS:
        if mask.shape[0] % m:
            continue
        data = struct.pack("<B", m) + entropy.encode(_symbols(mask, m), 1 << m)
        if best is None or len(data) < len(best):
            best = data
    return best


def decode(data: bytes, shape) -> np.ndarray:
    """The mask `encode` was given, with `shape`."""
    if len(data) < 1:
        raise errors.CorruptData("a mask section is empty")
    m = data[0]
    shape = tuple(shape) or (1,)
    if m not in GROUPS or shape[0] % m:
        raise errors.CorruptData(f"a mask section has group size {m}, impossible for shape {shape}")
    symbols = entropy.decode(data[1:])
    rest = int(np.prod(shape[1:], dtype=np.int64))
    if symbols.size != shape[0] // m * rest:
        raise errors.CorruptData(f"a mask section decodes to {symbols.size} groups, expected {shape[0] // m * rest}")
    bits = (symbols[:, None] >> np.arange(m)[None, :]) & 1  # (groups * rest, m)
    return bits.reshape(shape[0] // m, rest, m).transpose(0, 2, 1).reshape(shape).astype(bool)
