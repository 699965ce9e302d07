"""A range coder over integer frequency tables: each symbol is coded as (cumulative low, frequency, total).

    enc = rangecoder.Encoder()
    enc.encode(lo, freq, total)             # the symbol occupies [lo, lo + freq) of [0, total)
    data = enc.finish()                     # bytes (trailing zero bytes dropped)

    dec = rangecoder.Decoder(data)
    t = dec.target(total)                   # a point in [0, total): the symbol whose [lo, lo + freq) holds it
    dec.advance(lo, freq)                   # consume it (the caller looked the symbol up in its table)

The models are the caller's integer tables, so encoder and decoder agree exactly whatever produced them (the LM
coder builds them on the device; `research.coding.lm`). Totals may differ per symbol, up to 2**32.

Arithmetic: a 64-bit low with a carry bit and a 64-bit range renormalised a byte at a time to stay >= 2**56, with
the carry propagated through a cached byte and a count of pending 0xFF bytes (the scheme of LZMA's range coder,
widened from 32 to 64 bits; Python integers make the width free). Each symbol costs -log2(freq / total) bits plus
at most total / 2**56 of it for the truncated range, so with totals near 2**30 the loss is below 2**-25 relative.
The output's first byte (always zero: the code value lies in the initial interval) is not written, the final
interval is closed by the value in it with the most trailing zero bytes, and those trailing zeros are dropped: the
decoder reads zeros past the end. An empty message is zero bytes.
"""

from __future__ import annotations

_BITS = 64
_MASK = (1 << _BITS) - 1
_TOP = 1 << (_BITS - 8)  # renormalise when the range falls below this
MAX_TOTAL = 1 << 32


class Encoder:
    """Codes symbols given as (lo, freq, total) integers with 0 <= lo, 1 <= freq, lo + freq <= total <= 2**32."""

    def __init__(self):
        self._low, self._range = 0, _MASK
        self._cache, self._pending, self._first = 0, 0, True
        self._out = bytearray()

    def encode(self, lo: int, freq: int, total: int) -> None:
        """Codes the symbol occupying [lo, lo + freq) of [0, total)."""
        r = self._range // total
        self._low += r * lo
        self._range = r * freq
        while self._range < _TOP:
            self._range <<= 8
            self._shift()

    def _shift(self) -> None:
        low = self._low
        if low < 0xFF << (_BITS - 8) or low > _MASK:  # the top byte is settled (or a carry settles it)
            carry = low >> _BITS
            if self._first:
                self._first = False  # the leading byte is zero and is not written
            else:
                self._out.append((self._cache + carry) & 0xFF)
            self._out.extend(bytes([(0xFF + carry) & 0xFF]) * self._pending)
            self._pending = 0
            self._cache = (low >> (_BITS - 8)) & 0xFF
        else:
            self._pending += 1
        self._low = (low << 8) & _MASK

    def finish(self) -> bytes:
        """The coded bytes. The encoder must not be used afterwards."""
        self._low = (self._low + _TOP - 1) & ~(_TOP - 1)  # in [low, low + range): its low 56 bits are zero
        self._shift()
        self._shift()
        return bytes(self._out).rstrip(b"\0")

    def __len__(self) -> int:
        """Bytes written so far (a lower bound on the final size)."""
        return len(self._out) + self._pending


class Decoder:
    """Decodes what `Encoder` wrote, given the same tables: `target(total)` then `advance(lo, freq)` per symbol.

    Reading past the end of the data reads zero bytes (the encoder dropped them). Damaged data decodes to wrong
    symbols, never to an exception; the caller checks what it decoded.
    """

    def __init__(self, data: bytes):
        self._data, self._pos = bytes(data), 0
        self._range, self._code, self._r = _MASK, 0, 1
        for _ in range(_BITS // 8):
            self._code = (self._code << 8) | self._byte()

    def _byte(self) -> int:
        b = self._data[self._pos] if self._pos < len(self._data) else 0
        self._pos += 1
        return b

    def target(self, total: int) -> int:
        """The point in [0, total) that names the next symbol under a table with this total."""
        self._r = self._range // total
        return min(self._code // self._r, total - 1)

    def advance(self, lo: int, freq: int) -> None:
        """Consumes the symbol [lo, lo + freq) that holds the last `target`."""
        self._code -= self._r * lo
        self._range = self._r * freq
        while self._range < _TOP:
            self._code = ((self._code << 8) | self._byte()) & _MASK
            self._range <<= 8
