"""The range coder: exact round trips for any integer tables, sizes within a few bytes of the ideal, carries."""

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from research.coding import rangecoder


def _round_trip(tables, symbols):
    enc, ideal = rangecoder.Encoder(), 0.0
    for cum, s in zip(tables, symbols):
        enc.encode(int(cum[s]), int(cum[s + 1] - cum[s]), int(cum[-1]))
        ideal -= math.log2((cum[s + 1] - cum[s]) / cum[-1])
    data = enc.finish()
    dec, out = rangecoder.Decoder(data), []
    for cum in tables:
        s = int(np.searchsorted(cum, dec.target(int(cum[-1])), side="right")) - 1
        dec.advance(int(cum[s]), int(cum[s + 1] - cum[s]))
        out.append(s)
    return data, out, ideal


@given(st.integers(0, 2**32 - 1), st.integers(0, 300), st.integers(1, 40), st.integers(1, 32))
@settings(max_examples=60, deadline=None)
def test_any_tables_round_trip_within_two_bytes_of_the_ideal(seed, n, vocab, total_bits):
    rng = np.random.default_rng(seed)
    tables, symbols = [], []
    for _ in range(n):
        f = rng.integers(1, 2**16, vocab).astype(np.int64)
        if rng.random() < 0.5:
            f[rng.integers(vocab)] = 2 ** (total_bits - 1)  # peaked: symbols of a tiny cost
        while f.sum() > 2**32:
            f = np.maximum(1, f // 2)
        tables.append(np.concatenate([[0], np.cumsum(f)]))
        symbols.append(int(rng.integers(vocab)) if rng.random() < 0.3 else int(np.argmax(f)))
    data, out, ideal = _round_trip(tables, symbols)
    assert out == symbols
    assert len(data) <= ideal / 8 + 2


def test_carries_and_edges():
    assert rangecoder.Encoder().finish() == b""  # the empty message
    top = np.array([0, 2**32 - 1, 2**32])  # the top symbol over and over pushes 0xFF bytes and carries
    low = np.array([0, 1, 2**32])
    for symbols in ([1] * 500, [0] * 500, [1, 0] * 250, [1] * 100 + [0] + [1] * 100):
        tables = [top if s == 1 else low for s in symbols]
        data, out, ideal = _round_trip(tables, [1 if s == 1 else 0 for s in symbols])
        assert out == [1 if s == 1 else 0 for s in symbols] and len(data) <= ideal / 8 + 2
