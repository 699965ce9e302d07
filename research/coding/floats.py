"""Bit-exact coding of float arrays: the exponent and the sign/mantissa bits as separate entropy-coded streams.

A float of width W = 1 + E + M bits (fp32: E 8, M 23; bf16: E 8, M 7; fp16: E 5, M 10) is split into
  - the exponent field, one symbol of E bits per value (trained weights use few exponents: ~2.5-3 bits of entropy);
  - the sign bit followed by the mantissa (1 + M bits), cut from the top into a first chunk of (1 + M) % 8 bits
    (when not a whole byte) and then whole bytes (fp32: 3 bytes; bf16: 1; fp16: 3 bits and 1 byte).
Each stream is coded with `entropy.encode` against its own histogram (raw when that is not smaller), so planes that
are constant (the low mantissa bytes of an upcast bf16 tensor) cost a few bytes and near-random ones cost their
raw size. Decoding reassembles the bit patterns, so every value comes back bit for bit: -0.0, subnormals, Inf and
NaN payloads included. This is the byte-plane idea of ZipNN and DFloat11, with ANS in place of Huffman.

Layout of `encode(x)`: u8 number of streams, then per stream u32 length and the stream's bytes. The dtype and the
shape are the caller's to store (the container keeps them in its header).
"""

from __future__ import annotations

import struct

import ml_dtypes
import numpy as np

from research import errors
from research.coding import entropy

# dtype name -> (width, exponent bits, mantissa bits, unsigned view)
FORMATS = {
    "float32": (32, 8, 23, np.uint32),
    "bfloat16": (16, 8, 7, np.uint16),
    "float16": (16, 5, 10, np.uint16),
}


def dtype_name(x) -> str:
    name = np.dtype(x.dtype).name
    if name not in FORMATS:
        raise errors.UserError(f"bit-exact float coding takes {sorted(FORMATS)} arrays, got {name}")
    return name


def _chunks(mbits: int) -> list[int]:
    """Bit widths of the sign+mantissa chunks, top first."""
    total = 1 + mbits
    first = total % 8
    return ([first] if first else []) + [8] * (total // 8)


def planes(x) -> list[tuple[np.ndarray, int]]:
    """The (symbols, alphabet) streams of a float array (see the module docstring); symbols as uint8/uint16."""
    name = dtype_name(x)
    _, ebits, mbits, view = FORMATS[name]
    u = np.ascontiguousarray(x).view(view).ravel().astype(np.uint32)
    small = np.uint8 if ebits <= 8 else np.uint16
    out = [(((u >> mbits) & ((1 << ebits) - 1)).astype(small), 1 << ebits)]
    rest = ((u >> (ebits + mbits)) << mbits) | (u & ((1 << mbits) - 1))  # sign, then the mantissa
    shift = 1 + mbits
    for width in _chunks(mbits):
        shift -= width
        out.append((((rest >> shift) & ((1 << width) - 1)).astype(np.uint8), 1 << width))
    return out


def encode(x) -> bytes:
    """Bit-exact coded bytes of a float32 / bfloat16 / float16 array (any shape; the shape is not stored)."""
    streams = [entropy.encode(s, a) for s, a in planes(np.asarray(x))]
    return struct.pack("<B", len(streams)) + b"".join(struct.pack("<I", len(s)) + s for s in streams)


def split(data: bytes) -> list[bytes]:
    """The streams of `encode`'s output, with their lengths checked."""
    mv = memoryview(data)
    if not len(mv):
        raise errors.CorruptData("a float section is empty")
    (k,) = struct.unpack_from("<B", mv, 0)
    pos, out = 1, []
    for _ in range(k):
        if pos + 4 > len(mv):
            raise errors.CorruptData("a float section ends inside a stream header")
        (length,) = struct.unpack_from("<I", mv, pos)
        pos += 4
        if pos + length > len(mv):
            raise errors.CorruptData("a float stream runs past the end of its section")
        out.append(bytes(mv[pos : pos + length]))
        pos += length
    if pos != len(mv):
        raise errors.CorruptData("a float section has trailing bytes")
    return out


def decode(data: bytes, dtype: str, shape) -> np.ndarray:
    """The array `encode` was given, bit for bit."""
    if dtype not in FORMATS:
        raise errors.CorruptData(f"unknown float dtype {dtype!r}")
    _, ebits, mbits, view = FORMATS[dtype]
    streams = split(data)
    widths = _chunks(mbits)
    if len(streams) != 1 + len(widths):
        raise errors.CorruptData(f"a {dtype} section holds {len(streams)} streams, expected {1 + len(widths)}")
    n = int(np.prod(shape, dtype=np.int64))
    symbols = [entropy.decode(s) for s in streams]
    if any(len(s) != n for s in symbols):
        raise errors.CorruptData(f"a {dtype} section decodes to the wrong number of values (expected {n})")
    rest = np.zeros(n, np.uint32)
    for s, width in zip(symbols[1:], widths):
        rest = (rest << np.uint32(width)) | s.astype(np.uint32)
    sign = rest >> np.uint32(mbits)
    mant = rest & np.uint32((1 << mbits) - 1)
    u = (sign << np.uint32(ebits + mbits)) | (symbols[0].astype(np.uint32) << np.uint32(mbits)) | mant
    return u.astype(view).view(np.dtype(_numpy_dtype(dtype))).reshape(shape)


def _numpy_dtype(name: str):
    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)
