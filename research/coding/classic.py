"""The classic general-purpose compressors, for comparison on the same bytes: gzip -9, bz2 -9, xz -9e, zstd -19.

    sizes = classic.compress_all(data)        # {"gzip -9": bytes, "bz2 -9": ..., "xz -9e": ..., "zstd -19": ...}

Python's own gzip, bz2 and lzma modules and `zstandard`; every result is checked to decompress to the input.
"""

from __future__ import annotations

import bz2
import gzip
import lzma


def _zstd(level: int):
    import zstandard

    return (
        lambda d: zstandard.ZstdCompressor(level=level).compress(d),
        lambda c: zstandard.ZstdDecompressor().decompress(c),
    )


CODECS = {
    "gzip -9": (lambda d: gzip.compress(d, 9, mtime=0), gzip.decompress),
    "bz2 -9": (lambda d: bz2.compress(d, 9), bz2.decompress),
    "xz -9e": (lambda d: lzma.compress(d, preset=9 | lzma.PRESET_EXTREME), lzma.decompress),
    "zstd -19": _zstd(19),
}


def compress_all(data: bytes) -> dict[str, int]:
    """{codec: compressed size in bytes} of `data` under every codec (each round trip checked)."""
    out = {}
    for name, (enc, dec) in CODECS.items():
        c = enc(data)
        if dec(c) != data:
            raise RuntimeError(f"{name} did not round-trip")  # a library bug, not a user error
        out[name] = len(c)
    return out
