"""The packed-model file: a versioned header (JSON) that lists every section, the sections, and checksums.

Layout (little-endian), version 1:

    offset 0     8 bytes   magic b"ZIPLMPK\\n"
    8            u16       format version (1)
    10           u16       reserved (0)
    12           u64       H, the header's length in bytes
    20           H bytes   the header: UTF-8 JSON (see below), zlib-compressed
    20 + H       u32       CRC-32 of the header bytes
    24 + H       ...       the sections, back to back (offsets in the header count from here)
    end - 40     32 bytes  SHA-256 of every byte before it
    end - 8      8 bytes   end magic b"ZIPLMEND"

The header holds {"format": "ziplm-packed", "version": 1, "meta": {...}, "leaves": [...]}; each leaf records its
path, shape, dtype, kind (see `pack`), the CRC-32 of its decoded bytes, and its sections as {"name": {"offset",
"length", "crc32", "bound_bits", "huffman_bits"}}. So a `Reader` lists the contents (and `inspect` their sizes)
after reading only the header, and a reader checks, in order: the magic and version, that the header and
every section lie inside the file, the header's CRC, each section's CRC before decoding it, and each decoded leaf's
CRC after. `verify` also checks the whole-file SHA-256. Any failure raises `errors.CorruptData` naming what is
wrong; nothing is decoded from bytes that failed a check.

`write` writes to a temporary file beside the target and renames it into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from pathlib import Path

import numpy as np

from research import errors, files

MAGIC, END = b"ZIPLMPK\n", b"ZIPLMEND"
VERSION = 1
FORMAT = "ziplm-packed"
_FIXED = struct.Struct("<8sHHQ")  # magic, version, reserved, header length
FOOTER = 40


MAX_HEADER = 64 << 20  # inflated header bytes: a leaf record is ~300 bytes, so ~200,000 leaves
MAX_ELEMENTS = 2**40  # elements of one leaf
LEAF_DTYPES = ("float32", "bfloat16", "float16")  # what `floats` codes bit-exactly


def _count(v) -> bool:
    """A JSON value that is a non-negative integer (not a bool)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def crc(data) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def write(path, meta: dict, leaves: list[dict], blobs: list[dict[str, bytes]], *, overwrite: bool = False) -> int:
    """Writes a packed file; returns its size in bytes.

    Args:
      path: the target file; an existing one is refused unless `overwrite`.
      meta: JSON-able model metadata (config, tokenizer, source, ...).
      leaves: per leaf, its JSON record without "sections" (path, shape, dtype, kind, crc32, ...).
      blobs: per leaf, {section name: bytes}, in the order the sections are stored; the leaf record's "bounds"
        dict may give a section's (entropy bound, Huffman size) in bits.
    """
    path = files.check_writable(path, overwrite=overwrite)
    header = _header(meta, leaves, blobs)
    digest = hashlib.sha256()
    with files.atomic_file(path, overwrite=overwrite) as f:

        def put(b):
            f.write(b)
            digest.update(b)

        put(_FIXED.pack(MAGIC, VERSION, 0, len(header)))
        put(header)
        put(struct.pack("<I", crc(header)))
        for sections in blobs:
            for data in sections.values():
                put(data)
        f.write(digest.digest() + END)
    return path.stat().st_size


def _header(meta: dict, leaves: list[dict], blobs: list[dict[str, bytes]]) -> bytes:
    """The compressed header of a file of these leaves (`write`'s arguments; the leaf dicts are not changed)."""
    offset, records = 0, []
    for leaf, sections in zip(leaves, blobs, strict=True):
        bounds = leaf.get("bounds", {})
        entry = {k: v for k, v in leaf.items() if k != "bounds"}
        entry["sections"] = {}
        for name, data in sections.items():
            bound, huffman = bounds.get(name, (None, None))
            entry["sections"][name] = dict(
                offset=offset, length=len(data), crc32=crc(data), bound_bits=bound, huffman_bits=huffman
            )
            offset += len(data)
        records.append(entry)
    return zlib.compress(json.dumps(dict(format=FORMAT, version=VERSION, meta=meta, leaves=records)).encode(), 9)


def header_of(data: bytes) -> dict:
    """The header of a packed file's bytes, unchecked (for `with_header`)."""
    (hlen,) = struct.unpack_from("<Q", data, 12)
    return json.loads(zlib.decompress(data[_FIXED.size : _FIXED.size + hlen]))


def with_header(data: bytes, header, raw: bytes | None = None) -> bytes:
    """A packed file's bytes with another header (or raw header bytes) and every checksum recomputed (the header
    CRC and the whole-file SHA-256), as an adversary would make it: the crafted files of the fault-injection
    tests, which only the header's schema can refuse."""
    (hlen,) = struct.unpack_from("<Q", data, 12)
    raw = raw if raw is not None else zlib.compress(json.dumps(header).encode())
    body = data[:12] + struct.pack("<Q", len(raw)) + raw + struct.pack("<I", crc(raw))
    body += data[_FIXED.size + hlen + 4 : -FOOTER]
    return body + hashlib.sha256(body).digest() + END


def overhead(meta: dict, leaves: list[dict], blobs: list[dict[str, bytes]]) -> int:
    """Bytes of a file of these leaves beyond their sections: framing, header and footer."""
    return _FIXED.size + len(_header(meta, leaves, blobs)) + 4 + FOOTER


class Reader:
    """An open packed file: the checked header, and the sections on demand (each CRC-checked)."""

    def __init__(self, path):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise errors.UserError(f"packed model {self.path} does not exist")
        self.size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            fixed = f.read(_FIXED.size)
            if len(fixed) < _FIXED.size:
                raise errors.CorruptData(f"{self.path}: {self.size} bytes is too short for a packed model header")
            magic, version, _, hlen = _FIXED.unpack(fixed)
            if magic != MAGIC:
                raise errors.CorruptData(f"{self.path} is not a ziplm packed model (wrong magic {magic!r})")
            if version != VERSION:
                raise errors.CorruptData(f"{self.path} is format version {version}; this ziplm reads version {VERSION}")
            self.data_start = _FIXED.size + hlen + 4
            if self.data_start + FOOTER > self.size:
                raise errors.CorruptData(
                    f"{self.path} is truncated: its header claims {hlen} bytes, the file has {self.size}"
                )
            raw = f.read(hlen)
            (want,) = struct.unpack("<I", f.read(4))
            if crc(raw) != want:
                raise errors.CorruptData(f"{self.path}: the header fails its checksum (the file is damaged)")
            f.seek(self.size - 8)
            if f.read(8) != END:
                raise errors.CorruptData(f"{self.path} is truncated or damaged: no end marker")
        try:
            inflate = zlib.decompressobj()
            text = inflate.decompress(raw, MAX_HEADER)
            if inflate.unconsumed_tail:
                raise errors.CorruptData(f"{self.path}: the header inflates past {MAX_HEADER >> 20} MiB (damaged)")
            self.header = json.loads(text)
        except (ValueError, zlib.error) as e:
            raise errors.CorruptData(f"{self.path}: the header is not valid JSON ({e})") from None
        self.data_end = self.size - FOOTER
        self._validate()

    def _validate(self) -> None:
        """The header against its schema, before anything is allocated from it: types, shapes, dtypes, and the
        sections tiling the data region exactly (their lengths add up to the file's)."""

        def bad(what):
            raise errors.CorruptData(f"{self.path}: the header {what} (the file is damaged)")

        h = self.header
        if not isinstance(h, dict) or h.get("format") != FORMAT:
            got = h.get("format") if isinstance(h, dict) else type(h).__name__
            raise errors.CorruptData(f"{self.path}: header format {got!r}, expected {FORMAT!r}")
        if h.get("version") != VERSION or isinstance(h.get("version"), bool):
            bad(f"says version {h.get('version')!r}, not {VERSION}")
        if not isinstance(h.get("meta"), dict) or not isinstance(h.get("leaves"), list):
            bad("lacks its meta record or leaf list")
        end = 0
        for i, leaf in enumerate(h["leaves"]):
            if not isinstance(leaf, dict) or not isinstance(leaf.get("path"), str):
                bad(f"has a malformed record for leaf {i}")
            where = f"record of {leaf['path']}"
            shape = leaf.get("shape")
            if not isinstance(shape, list) or len(shape) > 8 or not all(_count(d) for d in shape):
                bad(f"{where} has an invalid shape {shape!r}")
            if int(np.prod(shape, dtype=np.float64)) > MAX_ELEMENTS:
                bad(f"{where} has {int(np.prod(shape, dtype=np.float64)):,} elements, more than ziplm writes")
            if leaf.get("dtype") not in LEAF_DTYPES or not isinstance(leaf.get("kind"), str):
                bad(f"{where} has dtype {leaf.get('dtype')!r} / kind {leaf.get('kind')!r}")
            if not _count(leaf.get("crc32")) or not isinstance(leaf.get("sections"), dict):
                bad(f"{where} lacks its checksum or sections")
            for name, sec in leaf["sections"].items():
                if not isinstance(sec, dict) or not all(_count(sec.get(k)) for k in ("offset", "length", "crc32")):
                    bad(f"{where} has a malformed section {name!r}")
                for k in ("bound_bits", "huffman_bits"):  # sizes `report` adds up: None or a number >= 0
                    v = sec.get(k)
                    if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not v >= 0):
                        bad(f"{where}: section {name!r} has {k} {v!r}")
                if sec["offset"] != end:
                    bad(f"{where}: section {name!r} is not where the previous one ends")
                end += sec["length"]
                if self.data_start + end > self.data_end:
                    raise errors.CorruptData(
                        f"{self.path}: section {name!r} of {leaf['path']} runs past the end of the file"
                    )
        if self.data_start + end != self.data_end:
            bad(f"accounts for {end:,} section bytes, but the file holds {self.data_end - self.data_start:,}")

    @property
    def meta(self) -> dict:
        return self.header["meta"]

    @property
    def leaves(self) -> list[dict]:
        return self.header["leaves"]

    def section(self, leaf: dict, name: str) -> bytes:
        """A section's bytes, after its CRC check."""
        s = leaf["sections"][name]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + s["offset"])
            data = f.read(s["length"])
        if len(data) != s["length"] or crc(data) != s["crc32"]:
            raise errors.CorruptData(
                f"{self.path}: section {name!r} of {leaf['path']} fails its checksum (the file is damaged)"
            )
        return data

    def verify(self) -> None:
        """Checks the whole-file SHA-256 (CorruptData when it does not match)."""
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            remaining = self.size - FOOTER
            while remaining:
                chunk = f.read(min(remaining, 1 << 24))
                if not chunk:
                    break
                digest.update(chunk)
                remaining -= len(chunk)
            stored = f.read(32)
        if digest.digest() != stored:
            for leaf in self.leaves:  # name the damaged section when one of them is
                for name in leaf["sections"]:
                    self.section(leaf, name)
            raise errors.CorruptData(f"{self.path}: the file fails its SHA-256 checksum (damaged or truncated)")
