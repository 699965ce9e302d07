"""Entropy-coded streams of small integer symbols, with the empirical distribution stored beside them.

A stream is a 1-D array of symbols in [0, alphabet). `encode` codes it with `constriction`'s ANS coder against its
own histogram (a static model: the counts travel in the stream, so decoding needs nothing else) or stores it raw
when that is smaller (near-uniform symbols, tiny streams). The byte layout, little-endian:

    u8  coder      0 = raw, 1 = ANS
    u32 n          number of symbols
    u16 alphabet   symbols are in [0, alphabet), 1..65536 (stored as alphabet - 1)
    raw:  n symbols as uint8 (alphabet <= 256) or uint16
    ANS:  u16 m, then m (u16 symbol, u32 count) pairs for the symbols that occur, then the ANS words (uint32)

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
    return np.bincount(np.asarray(symbols, np.int64).ravel(), minlength=alphabet)[:alphabet]


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


def encode(symbols, alphabet: int) -> bytes:
    """The stream's bytes (see the module docstring): ANS against its histogram, or raw when that is smaller."""
    s = np.asarray(symbols).ravel()
    if not 1 <= alphabet <= 65536:
        raise ValueError(f"alphabet must be in 1..65536, got {alphabet}")
    if s.size and (s.min() < 0 or s.max() >= alphabet):
        raise ValueError(f"symbols must lie in [0, {alphabet}), got [{s.min()}, {s.max()}]")
    raw_dtype = np.uint8 if alphabet <= 256 else np.uint16
    raw = _HEAD.pack(RAW, s.size, alphabet - 1) + s.astype(raw_dtype).tobytes()
    counts = histogram(s, alphabet)
    used = np.flatnonzero(counts)
    if len(used) <= 1:  # zero or one distinct symbol: the table says it all
        table = struct.pack("<H", len(used)) + b"".join(struct.pack("<HI", u, counts[u]) for u in used)
        return _HEAD.pack(ANS, s.size, alphabet - 1) + table
    import constriction

    # Map the used symbols to 0..m-1 so the model's size is the number of distinct symbols, not the alphabet.
    dense = np.searchsorted(used, s).astype(np.int32)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(dense, _model(counts[used]))
    words = coder.get_compressed()
    pairs = np.empty(len(used), dtype=[("s", "<u2"), ("c", "<u4")])
    pairs["s"], pairs["c"] = used, counts[used]
    ans = _HEAD.pack(ANS, s.size, alphabet - 1) + struct.pack("<H", len(used)) + pairs.tobytes() + words.tobytes()
    return ans if len(ans) < len(raw) else raw


def decode(data: bytes) -> np.ndarray:
    """The symbols (int64) of a stream written by `encode`; damaged streams raise `errors.CorruptData`."""
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
        out = np.frombuffer(body, dtype).astype(np.int64)
    elif coder == ANS:
        if len(body) < 2:
            raise errors.CorruptData("a coded stream has no symbol table")
        (m,) = struct.unpack_from("<H", body, 0)
        table_end = 2 + 6 * m
        if len(body) < table_end:
            raise errors.CorruptData("a coded stream's symbol table runs past its end")
        pairs = np.frombuffer(body[2:table_end], dtype=[("s", "<u2"), ("c", "<u4")])
        used, counts = pairs["s"].astype(np.int64), pairs["c"].astype(np.int64)
        if counts.sum() != n or (m and (used.max() >= alphabet or np.any(np.diff(used) <= 0))):
            raise errors.CorruptData("a coded stream's symbol table does not match its length")
        if m <= 1:
            return np.full(n, used[0] if m else 0, np.int64)
        words = body[table_end:]
        if len(words) % 4:
            raise errors.CorruptData("a coded stream's payload is not whole 32-bit words")
        import constriction

        try:
            dec = constriction.stream.stack.AnsCoder(np.frombuffer(words, np.uint32).copy())
            dense = dec.decode(_model(counts), n)
        except Exception as e:  # constriction reports exhausted or inconsistent data as a plain error
            raise errors.CorruptData(f"a coded stream does not decode ({e})") from None
        out = used[np.asarray(dense, np.int64)]
    else:
        raise errors.CorruptData(f"unknown stream coder {coder}")
    return out


def stats(symbols, alphabet: int, coded: bytes) -> dict:
    """Sizes of one stream: coded bytes, the entropy bound, its table and the Huffman baseline, in bits."""
    counts = histogram(symbols, alphabet)
    return dict(
        n=int(np.size(symbols)),
        coded_bits=8 * len(coded),
        entropy_bits=entropy_bits(counts),
        table_bits=8 * (2 + 6 * int(np.count_nonzero(counts))),
        huffman_bits=huffman_bits(counts),
    )
