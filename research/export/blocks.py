"""GGUF's block quantization types as grids: which grid codes a type stores exactly, and their bytes.

Every type quantizes blocks of 32 consecutive values of a row (a row is one output's inputs: ggml's ne0):

    type   bytes per block                                 value of code q      q
    Q4_0   fp16 d, 16 bytes of nibbles                     (q - 8) * d          0..15
    Q4_1   fp16 d, fp16 m, 16 bytes of nibbles             q * d + m            0..15
    Q5_0   fp16 d, 4 bytes of high bits, 16 of nibbles     (q - 16) * d         0..31
    Q5_1   fp16 d, fp16 m, 4 bytes of high bits, 16        q * d + m            0..31
    Q8_0   fp16 d, 32 int8                                 q * d                -128..127

A ziplm grid (`codes.Grid`: value = (c - z) * s, or c * s + z with a float minimum) is one of these exactly when its
scale (and minimum) is one float16 number per block of 32 and its codes fit: an integer-zero grid goes to the
symmetric types with q = c - z + offset, a float-minimum grid to the `_1` types with q = c, d = s, m = z (and an
integer-zero grid to them with m = -z * s, when that product is a float16 number). `express` derives the blocks,
and `exact` checks them the only way that settles it: the `gguf` package's dequantization of the bytes equals the
grid's values bit for bit. Nothing is re-rounded: the codes are the ones the method chose (GPTQ's, not llama.cpp's
round-to-nearest of GPTQ's output).

`requantize` is llama.cpp's own round-to-nearest (the `gguf` package's reference quantizers, which follow
ggml-quants.c), for dense weights and for `--requantize`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from research import codes as codes_lib

BLOCK = 32


@dataclasses.dataclass(frozen=True)
class BlockType:
    """One GGUF block type: code width, the offset of its symmetric codes (None: a float minimum m)."""

    name: str
    bits: int
    offset: int | None

    @property
    def bytes_per_block(self) -> int:
        nibbles = BLOCK if self.bits == 8 else BLOCK // 2  # int8 bytes, or the low 4 bits of two codes per byte
        return 2 + (2 if self.offset is None else 0) + (4 if self.bits == 5 else 0) + nibbles

    @property
    def qmin(self) -> int:
        return -128 if self.name == "Q8_0" else 0

    @property
    def qmax(self) -> int:
        return 127 if self.name == "Q8_0" else 2**self.bits - 1


TYPES = {
    t.name: t
    for t in (
        BlockType("Q4_0", 4, 8),
        BlockType("Q4_1", 4, None),
        BlockType("Q5_0", 5, 16),
        BlockType("Q5_1", 5, None),
        BlockType("Q8_0", 8, 0),
    )
}  # in order of size: the smallest type that holds a tensor exactly is the first that does


def to_bytes(kind: BlockType, q: np.ndarray, d: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
    """The bytes of a tensor of blocks, as GGUF stores them.

    Args:
      kind: the block type.
      q: (rows, n) integer codes in [kind.qmin, kind.qmax], n a multiple of 32.
      d: (rows, n / 32) float16 block scales; m: the same shape, float16 minimums (the `_1` types only).

    Returns:
      uint8 (rows, n / 32 * kind.bytes_per_block).
    """
    rows, n = q.shape
    q = q.reshape(rows, n // BLOCK, BLOCK)
    parts = [np.ascontiguousarray(d, np.float16)[..., None].view(np.uint8)]  # (rows, nb, 2)
    if kind.offset is None:
        parts.append(np.ascontiguousarray(m, np.float16)[..., None].view(np.uint8))
    if kind.bits == 8:
        parts.append(q.astype(np.int8).view(np.uint8))
    else:
        q = q.astype(np.uint8)
        if kind.bits == 5:
            parts.append(np.packbits((q >> 4) & 1, axis=-1, bitorder="little"))  # bit i: the high bit of q[i]
        low = q & 0x0F
        parts.append(low[..., : BLOCK // 2] | (low[..., BLOCK // 2 :] << 4))  # byte j: q[j] low, q[j + 16] high
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def dequantize(kind: BlockType, data: np.ndarray) -> np.ndarray:
    """The float32 values GGUF gives for blocks (the `gguf` package's dequantizer: llama.cpp's formula)."""
    import gguf

    qt = gguf.GGMLQuantizationType[kind.name]
    return np.asarray(gguf.quants.dequantize(data, qt), np.float32).reshape(data.shape[0], -1)


def requantize(kind: BlockType, w: np.ndarray) -> np.ndarray:
    """llama.cpp's round-to-nearest of float rows (rows, n) into `kind` (the package's reference quantizer)."""
    import gguf

    return gguf.quants.quantize(np.ascontiguousarray(w, np.float32), gguf.GGMLQuantizationType[kind.name])


def _fp16(x: np.ndarray) -> bool:
    return bool(np.array_equal(x.astype(np.float16).astype(np.float32), x, equal_nan=False))


def express(kind: BlockType, c: np.ndarray, s: np.ndarray, z: np.ndarray, float_zero: bool):
    """The blocks of `kind` that hold a grid exactly, or why there are none.

    Args:
      kind: the target type.
      c, s, z: (rows, n) codes, scales and zero points (or minimums) of every element, as the grid applies them
        (`Layout.expand`ed), in the GGUF row layout (rows = outputs).
      float_zero: the grid's value is c * s + z (a float minimum) instead of (c - z) * s.

    Returns:
      The uint8 block bytes (checked: they dequantize to the grid's values bit for bit), or a str: the reason.
    """
    rows, n = c.shape
    if n % BLOCK:
        return f"its rows of {n} are not a multiple of the block of {BLOCK}"
    blocks = (rows, n // BLOCK, BLOCK)
    s3, z3 = s.reshape(blocks), z.reshape(blocks)
    d, zb = s3[..., 0], z3[..., 0]  # (rows, nb)
    if not (
        np.array_equal(s3, np.broadcast_to(d[..., None], blocks))
        and np.array_equal(z3, np.broadcast_to(zb[..., None], blocks))
    ):
        return (
            f"its scales or zero points change inside a block of {BLOCK} values (groups must be multiples of {BLOCK})"
        )
    if not _fp16(d):
        return "its scales are not float16 numbers (quantize with param_dtype='float16', or gguf=...)"
    values = codes_lib.grid_values(c, s, z, codes_lib.Layout("tensor"), float_zero)  # what ziplm computes
    c = c.astype(np.int32)
    if kind.offset is not None:
        if float_zero:
            return f"a float-minimum grid has no zero code; {kind.name} stores (q - {kind.offset}) * d"
        q = c - z.astype(np.int32) + kind.offset
        m = None
    else:
        q = c
        m = zb if float_zero else -zb * d
        if not _fp16(m):
            return "its minimums (-zero * scale) are not float16 numbers"
    lo, hi = int(q.min(initial=0)), int(q.max(initial=0))
    if lo < kind.qmin or hi > kind.qmax:
        if kind.offset is None:
            return f"its codes span {lo}..{hi}, {kind.name} holds {kind.qmin}..{kind.qmax}"
        off = kind.offset
        span, holds = f"{lo - off}..{hi - off}", f"{kind.qmin - off}..{kind.qmax - off}"
        return f"its codes span {span} around the zero point, {kind.name} holds {holds}"
    data = to_bytes(kind, q, d, m)
    if not codes_lib.same_bits(dequantize(kind, data), values):
        return f"{kind.name}'s dequantization differs from the grid's values in the last bits (float rounding)"
    return data


def exact_dense(kind: BlockType, w: np.ndarray, probe_rows: int = 64):
    """Bytes of `kind` that give the dense rows `w` (rows, n) bit for bit, or None when round-to-nearest does not
    reproduce them (a model that came from a GGUF file of that type does; checked on `probe_rows` rows first)."""
    if w.ndim != 2 or w.shape[1] % BLOCK:
        return None
    w = np.asarray(w, np.float32)
    for part in (w[:probe_rows], w):
        data = requantize(kind, part)
        if not codes_lib.same_bits(dequantize(kind, data), part):
            return None
    return data
