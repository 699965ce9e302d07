"""Entropy-coded streams of small integer symbols, with the empirical distribution stored beside them.

A stream is a 1-D array of symbols in [0, alphabet). `encode` codes it with `constriction`'s ANS coder against its
own histogram (a static model: the counts travel in the stream, so decoding needs nothing else) or stores it raw
when that is smaller (near-uniform symbols, tiny streams). The byte layout, little-endian:

    u8  coder      0 = raw, 1 = ANS
    u32 n          number of symbols
    u16 alphabet   symbols are in [0, alphabet), 1..65536 (stored as alphabet - 1)
    raw:  n symbols as uint8 (alphabet <= 256) or uint16
    ANS:  u16 lo, u32 m: the counts of the symbols lo .. lo + m - 1 (the range the stream uses), as LEB128
          varints, then u32 bytes of varints, the varints, then the ANS words (uint32)

Probabilities are the counts divided by n in float64, which constriction quantizes deterministically, so the
encoder and the decoder build the same model from the same counts. `entropy_bits` is the lower bound a stream
is compared against (the empirical entropy, n * H); `table_bytes` is what the stored counts cost on top of it.
`huffman_bits` gives the size of the Huffman code of the same histogram (Deep Compression's coder), the baseline.
"""

from __future__ import annotations

import heapq
import struct

import numpy as np

from research import errors

RAW, ANS = 0, 1
_HEAD = struct.Struct("<BIH")


def histogram(symbols: np.ndarray, alphabet: int) -> np.ndarray:
    """Counts (alphabet,) int64 of the symbols."""
    s = np.asarray(symbols).ravel()
    return np.bincount(s if s.dtype.kind == "u" else s.astype(np.int64), minlength=alphabet)[:alphabet]


def entropy_bits(counts: np.ndarray) -> float:
    """n * H(counts / n) in bits: the empirical-entropy bound of a stream with this histogram."""
    c = np.asarray(counts, np.float64)
    c = c[c > 0]
    n = c.sum()
    return float(-(c * np.log2(c / n)).sum()) if n else 0.0


def huffman_bits(counts: np.ndarray) -> int:
    """The length in bits of the Huffman code of a stream with this histogram (one symbol: 1 bit each)."""
    c = [int(x) for x in np.asarray(counts) if x > 0]
    if len(c) <= 1:
        return sum(c)
    heap = list(c)
    heapq.heapify(heap)
    total = 0
    while len(heap) > 1:  # every merge adds one bit to each symbol below it
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        total += a + b
        heapq.heappush(heap, a + b)
    return total


def _model(counts: np.ndarray):
    import constriction

    p = np.asarray(counts, np.float64)
    return constriction.stream.model.Categorical(p / p.sum(), perfect=False)


def varints(values) -> bytes:
    """Non-negative integers (< 2**63) as LEB128 varints: 7 bits a byte, the high bit set on all but the last."""
    v = np.asarray(values, np.uint64).ravel()
    if not v.size:
        return b""
    nbytes = np.ones(v.size, np.int64)
    for k in range(1, 10):
        nbytes += (v >> np.uint64(7 * k)) > 0
    total = int(nbytes.sum())
    out = np.zeros(total, np.uint8)
    starts = np.concatenate([[0], np.cumsum(nbytes)[:-1]])
    for k in range(int(nbytes.max())):
        has = nbytes > k
        byte = (v[has] >> np.uint64(7 * k)) & np.uint64(0x7F)
        more = (nbytes[has] > k + 1).astype(np.uint8) << 7
        out[starts[has] + k] = byte.astype(np.uint8) | more
    return out.tobytes()


def read_varints(data, pos: int, count: int) -> tuple[np.ndarray, int]:
    """`count` varints of `data` from byte `pos` on: (their values as uint64, the position after the last).

    Raises:
      CorruptData: the data ends inside them, or one is longer than 9 bytes (no `varints` output is).
    """
    if count == 0:
        return np.zeros(0, np.uint64), pos
    b = np.frombuffer(data, np.uint8)[pos : pos + 10 * count]  # 9 bytes at most per varint: no scan past them
    ends = np.flatnonzero(b < 0x80)[:count]
    if len(ends) < count:
        raise errors.CorruptData(f"the data ends inside a varint ({len(ends)} of {count} read)")
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > 9:
        raise errors.CorruptData("an oversized varint (more than 9 bytes)")
    out = np.zeros(count, np.uint64)
    for k in range(int(lengths.max())):
        has = lengths > k
        out[has] |= (b[starts[has] + k] & 0x7F).astype(np.uint64) << np.uint64(7 * k)
    return out, pos + int(ends[-1]) + 1


def from_varints(data, count: int) -> np.ndarray:
    """The `count` varints that make up all of `data` (uint64); CorruptData when they do not."""
    try:
        out, end = read_varints(data, 0, count)
    except errors.CorruptData as e:
        raise errors.CorruptData(f"a coded stream's table is damaged: {e}") from None
    if end != len(data):
        raise errors.CorruptData(f"a coded stream's table holds more than the {count} counts expected")
    return out


def encode(symbols, alphabet: int) -> bytes:
    """The stream's bytes (see the module docstring): ANS against its histogram, or raw when that is smaller."""
    s = np.asarray(symbols).ravel()
    if not 1 <= alphabet <= 65536:
        raise ValueError(f"alphabet must be in 1..65536, got {alphabet}")
    if s.size and (s.min() < 0 or s.max() >= alphabet):
        raise ValueError(f"symbols must lie in [0, {alphabet}), got [{s.min()}, {s.max()}]")
    head = _HEAD.pack(ANS, s.size, alphabet - 1)
    if not s.size:
        return head + struct.pack("<HI", 0, 0) + struct.pack("<I", 0)
    lo, hi = int(s.min()), int(s.max())
    counts = histogram(s, alphabet)[lo : hi + 1]
    table = varints(counts)
    table = struct.pack("<HI", lo, len(counts)) + struct.pack("<I", len(table)) + table
    if lo == hi:  # one distinct symbol: the table says it all
        return head + table
    raw_dtype = np.uint8 if alphabet <= 256 else np.uint16
    raw = _HEAD.pack(RAW, s.size, alphabet - 1) + s.astype(raw_dtype).tobytes()
    if len(table) + len(head) >= len(raw):
        return raw
    import constriction

    used = counts > 0
    dense = (np.cumsum(used, dtype=np.int32) - 1)[s - lo] if not used.all() else (s - lo).astype(np.int32)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(dense, _model(counts[used]))
    ans = head + table + coder.get_compressed().tobytes()
    return ans if len(ans) < len(raw) else raw


def _parse(data: bytes):
    """(coder, n, alphabet, the raw symbols or the (lo, counts) table, the ANS words) of a stream, checked."""
    mv = memoryview(data)
    if len(mv) < _HEAD.size:
        raise errors.CorruptData("a coded stream is shorter than its header")
    coder, n, alphabet = _HEAD.unpack_from(mv, 0)
    alphabet += 1
    body = mv[_HEAD.size :]
    if coder == RAW:
        dtype = np.uint8 if alphabet <= 256 else np.uint16
        if len(body) != n * np.dtype(dtype).itemsize:
            raise errors.CorruptData(f"a raw stream holds {len(body)} bytes for {n} symbols")
        out = np.frombuffer(body, dtype)
        if n and out.max() >= alphabet:
            raise errors.CorruptData("a raw stream holds a symbol outside its alphabet")
        return coder, n, alphabet, out, None
    if coder != ANS:
        raise errors.CorruptData(f"unknown stream coder {coder}")
    if len(body) < 10:
        raise errors.CorruptData("a coded stream has no symbol table")
    lo, m, tlen = struct.unpack_from("<HII", body, 0)
    if 10 + tlen > len(body) or lo + m > alphabet:
        raise errors.CorruptData("a coded stream's symbol table runs past its end or its alphabet")
    counts = from_varints(body[10 : 10 + tlen], m).astype(np.int64)
    if int(counts.sum()) != n:
        raise errors.CorruptData(f"a coded stream's counts add up to {int(counts.sum())}, not its length {n}")
    return coder, n, alphabet, (lo, counts), body[10 + tlen :]


def counts(data: bytes) -> np.ndarray:
    """The histogram of a stream's symbols, read from its table (raw streams: counted), without decoding it."""
    coder, _, alphabet, table, _ = _parse(data)
    if coder == RAW:
        return histogram(table, alphabet)
    lo, c = table
    return np.concatenate([np.zeros(lo, np.int64), c])


def decode(data: bytes) -> np.ndarray:
    """The symbols (an integer array) of a stream written by `encode`; damaged streams raise `errors.CorruptData`."""
    coder, n, _, table, words = _parse(data)
    if coder == RAW:
        return table
    lo, table_counts = table
    used = np.flatnonzero(table_counts)
    if len(used) <= 1:
        return np.full(n, lo + (used[0] if len(used) else 0), np.int64)
    if len(words) % 4:
        raise errors.CorruptData("a coded stream's payload is not whole 32-bit words")
    import constriction

    try:
        dec = constriction.stream.stack.AnsCoder(np.frombuffer(words, np.uint32).copy())
        dense = np.asarray(dec.decode(_model(table_counts[used]), n))  # int32
    except Exception as e:  # constriction reports exhausted or inconsistent data as a plain error
        raise errors.CorruptData(f"a coded stream does not decode ({e})") from None
    if len(used) == len(table_counts):  # every symbol of the range occurs: no renumbering to undo
        return dense + np.int32(lo)
    return (used.astype(np.int32) + np.int32(lo))[dense]


def stats(symbols, alphabet: int, coded: bytes) -> dict:
    """Sizes of one stream, in bits: coded, the entropy bound, its table, and the Huffman code of the histogram."""
    counts = histogram(symbols, alphabet)
    used = np.flatnonzero(counts)
    table = varints(counts[used[0] : used[-1] + 1]) if len(used) else b""
    return dict(
        n=int(np.size(symbols)),
        coded_bits=8 * len(coded),
        entropy_bits=entropy_bits(counts),
        table_bits=8 * len(table),
        huffman_bits=huffman_bits(counts),
    )
