"""Exact structure found in float32 weights with no hint: blocks on an affine grid, and small per-block palettes.

Dequantized checkpoints (GGUF's Q4_0 / Q4_1 / Q8_0, GPTQ, AWQ, ...) hold float32 weights that are, block by block,
exactly an affine function of small integer codes. `encode` finds such a grid by itself:

    value = fl(fl(d_b * (q - z)) + m_b)        float32 arithmetic, in this order

for every block b of B consecutive weights along one axis ("in": the first axis, the input dimension of a kernel
(in, out); "last": the last axis, along which GGUF blocks its embedding (vocab, d)), with q in [0, 256) an integer
code, z one integer per leaf, and d_b, m_b the block's scale and offset. GGUF's Q4_1 (d*q + m, fp16 d and m) is the
form with z = 0; Q4_0, Q8_0 and symmetric GPTQ (d * c with signed codes c) are the form with m_b = -0.0, which adds
nothing to any float32 (x + -0.0 is x bit for bit, -0.0 included), and z the smallest code's negation.

Search, per leaf, vectorised over all blocks (no Python loop over blocks):
  1. Every (axis, B) with B in `BLOCKS` (0: the whole axis) that divides the axis, in both forms ("affine": m_b is
     the block's minimum, q >= 0; "scale": m_b = -0.0, signed codes, d_b's sign chosen so that -0.0 entries come
     back) is tried on `SAMPLE` seeded random blocks (fewer, at least 8, when blocks are long); it passes when at
     least 90% of them are reproduced exactly. Leaves with no grid (trained floats) are given up here.
  2. The passing layouts are ranked by their estimated size (per-block parameters over B, plus the entropy of the
     sample's codes) and the best is fitted on every block: the step count s (the code span, e.g. 15, 127 or 8)
     the sample agrees on gives d = span / s; blocks it fails get s from their smallest gap between sorted
     distinct values. The candidate scales are the fp16 nearest to that d and its two fp16 neighbours, then the
     nearest fp32 and its neighbours up to two ulps; each block keeps the first that reproduces it bit for bit.
  3. Blocks whose smallest code is not 0 can need an offset other than their minimum: for the few blocks still
     failing, m = fp16(min - d k) is tried for k = 1 .. 16.
  4. Blocks that still fail (at most 1/32 of them, else the layout is rejected) are stored as exceptions: their
     indices and their raw float32 values.

Sections of an "affine" leaf: "codes" (the symbols q, 0 in exception blocks: one ANS stream or, when smaller, one
per index along the blocked axis, as the columns of an embedding have distributions of their own; u32 count, u32
lengths, streams), "scale" and "offset" (d_b and m_b, bit-exact floats: fp16 when every one is exactly an fp16,
else fp32), and with exceptions "where" (their block indices as LEB128 varints of the gaps) and "raw" (their
values). The record holds axis, block, zero, scale_dtype, offset_dtype and exceptions. The packer decodes the
result and compares it bit for bit before choosing it, as it does every representation, so a layout found here can
only lose to `float`, never change a weight.

`palette_problems` is the cheap check for hint-less palettes per channel or per block of B input entries (a
non-uniform quantizer's look-up table): it samples a few problems and names the layout whose distinct values pay.
"""

from __future__ import annotations

import struct

import numpy as np

from research import errors
from research.coding import entropy, floats

BLOCKS = (32, 64, 128, 16, 0)  # 0: the whole axis
SAMPLE = 64  # blocks tried per layout before fitting a whole leaf (fewer, at least 8, when blocks are long)
PASS = 0.9  # the fraction of sampled blocks that must be reproduced exactly
MAX_EXCEPTIONS = 1 / 32  # of the blocks, stored raw; more and the layout is rejected
MIN_SIZE = 512  # smaller leaves are left to the other kinds
CONTEXT_MIN = 4096  # codes per line below which one stream per line is not tried
PALETTE_BITS = 16.0  # estimated bits per weight under which a per-channel / per-block palette is tried
_NEG_ZERO = np.uint32(0x80000000)


# --- layouts -------------------------------------------------------------------------------------------------------


def _as2d(x: np.ndarray, axis: str) -> np.ndarray:
    return x.reshape(x.shape[0], -1) if axis == "in" else x.reshape(-1, x.shape[-1])


def _block_size(x2: np.ndarray, axis: str, block: int) -> int:
    return (x2.shape[0] if axis == "in" else x2.shape[1]) if block == 0 else block


def _blocks(x2: np.ndarray, axis: str, b: int) -> np.ndarray:
    """(n_blocks, b) rows: for "in", block (i, c) holds x2[i b : (i + 1) b, c]; for "last", consecutive entries."""
    if axis == "last":
        return x2.reshape(-1, b)
    n, c = x2.shape
    return x2.reshape(n // b, b, c).transpose(0, 2, 1).reshape(-1, b)


def _unblocks(rows: np.ndarray, shape2, axis: str, b: int) -> np.ndarray:
    if axis == "last":
        return rows.reshape(shape2)
    n, c = shape2
    return rows.reshape(n // b, c, b).transpose(0, 2, 1).reshape(n, c)


def _sample_rows(x2: np.ndarray, axis: str, b: int, idx: np.ndarray) -> np.ndarray:
    if axis == "last":
        return x2.reshape(-1, b)[idx]
    c = x2.shape[1]
    return x2[(idx // c)[:, None] * b + np.arange(b), (idx % c)[:, None]]


def _layouts(x: np.ndarray):
    """(axis, B) pairs that tile the leaf, each axis once per distinct block size."""
    out = []
    for axis, n in (("in", x.shape[0]), ("last", x.shape[-1])):
        for block in BLOCKS:
            b = n if block == 0 else block
            if b >= 2 and n % b == 0 and (axis, b) not in out:
                out.append((axis, b))
    return out


# --- fitting -------------------------------------------------------------------------------------------------------


def _rebuild(q: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """fl(fl(d * q) + m) in float32 per row: q (n, B) float32 codes (q - z, exact), d and m (n,) float32."""
    return q * d[:, None] + m[:, None]


def _bits(x: np.ndarray) -> np.ndarray:
    return x.view(np.uint32)


def _try(rows, d, m, signed: bool):
    """(exact (n,), codes (n, B) float32) of rows under per-row scale d and offset m."""
    q = np.rint((rows - m[:, None]) / d[:, None])
    np.clip(q, -255 if signed else 0, 255, out=q)
    np.nan_to_num(q, copy=False, nan=0.0)
    q += np.float32(0.0)  # -0.0 codes are +0.0, as the decoder's q - z gives them
    exact = (_bits(_rebuild(q, d, m)) == _bits(rows)).all(1)
    return exact, q


def _steps_from_gaps(rows: np.ndarray, span: np.ndarray) -> np.ndarray:
    """The number of grid steps in each row's span: the smallest gap between its sorted distinct values is the
    step, or 2, 3 or 4 steps when the gaps are not near-integer multiples of it (codes that skip neighbours)."""
    s = np.sort(rows, axis=1).astype(np.float64)
    gaps = np.diff(s, axis=1)
    gaps[gaps <= 0] = np.nan
    g = np.nanmin(np.where(np.isnan(gaps).all(1, keepdims=True), 1.0, gaps), axis=1)
    out = np.rint(span / g)
    undecided = np.ones(len(rows), bool)
    for k in (1, 2, 3, 4):
        r = gaps * (k / g)[:, None]
        fits = undecided & ~(np.abs(r - np.rint(r)) > 0.05).any(1)
        out[fits] = np.rint(span[fits] * k / g[fits])
        undecided &= ~fits
    return np.clip(out, 1, 255)


def _scale_candidates(d: np.ndarray):
    """Candidate scales (float32) near d (float64): the fp16 nearest and its neighbours, then fp32 ones."""
    h = d.astype(np.float16)
    inf16 = np.float16(np.inf)
    yield h.astype(np.float32)
    yield np.nextafter(h, inf16).astype(np.float32)
    yield np.nextafter(h, -inf16).astype(np.float32)
    f = d.astype(np.float32)
    up, down = np.nextafter(f, np.float32(np.inf)), np.nextafter(f, np.float32(-np.inf))
    yield from (f, up, down, np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf)))


def fit(rows: np.ndarray, form: str, steps: float | None = None, max_fail: float = 1.0):
    """Fits every row (block) of `rows` (n, B) float32 on a grid of the given form ("affine" or "scale").

    Args:
      rows: the blocks.
      form: "affine" (m = the block's minimum or near it, codes >= 0) or "scale" (m = -0.0, signed codes).
      steps: the code span to try first on every block (from a sample); None: from each block's gaps.
      max_fail: give up (all rows failed) when more than this fraction fails before the offset search.

    Returns:
      (exact (n,) bool, d (n,) float32, m (n,) float32, codes (n, B) int16); rows not exact have garbage.
    """
    n = len(rows)
    signed = form == "scale"
    ok = np.zeros(n, bool)
    d = np.zeros(n, np.float32)
    m = np.zeros(n, np.float32)
    q = np.zeros(rows.shape, np.int16)
    with np.errstate(all="ignore"):
        finite = np.isfinite(rows).all(1)
        if signed:
            span = np.abs(rows).max(1).astype(np.float64)
            sign = np.where((_bits(rows) == _NEG_ZERO).any(1), -1.0, 1.0)
            base = np.full(n, -0.0, np.float32)
        else:
            base = rows.min(1)
            span = rows.max(1).astype(np.float64) - base
            sign = np.ones(n)
        flat = finite & (span == 0)  # constant blocks: code 0, d = -0.0 (affine) or +-1 (scale; zeros only)
        d[flat] = np.where(sign[flat] < 0, -1.0, 1.0) if signed else -0.0
        m[flat] = base[flat]
        good, _ = _try(rows[flat], d[flat], m[flat], signed)
        ok[np.flatnonzero(flat)[good]] = True
        todo = np.flatnonzero(finite & ~flat)

        def attempt(idx, dc, mc):
            good, codes = _try(rows[idx], dc, mc, signed)
            hit = idx[good]
            ok[hit], d[hit], m[hit], q[hit] = True, dc[good], mc[good], codes[good]
            return idx[~good]

        est = np.zeros(n)
        for use_gaps in [False, True] if steps else [True]:
            if not len(todo):
                break
            s = _steps_from_gaps(rows[todo], span[todo]) if use_gaps else float(steps)
            est[todo] = span[todo] / s * sign[todo]
            for dc in _scale_candidates(est):
                todo = attempt(todo, dc[todo], base[todo])
                if not len(todo):
                    break
        if len(todo) > max_fail * n:
            return np.zeros(n, bool), d, m, q
        if not signed and len(todo):  # blocks whose smallest code is not 0: offsets below their minimum
            cands = list(_scale_candidates(est))[:4]
            for k in range(1, 17):
                for dc in cands:
                    for offset in (np.float16, np.float32):
                        if len(todo):
                            mk = base[todo].astype(np.float64) - dc[todo].astype(np.float64) * k
                            todo = attempt(todo, dc[todo], mk.astype(offset).astype(np.float32))
    return ok, d, m, q


# --- a leaf --------------------------------------------------------------------------------------------------------


def _exact_fp16(a: np.ndarray) -> bool:
    with np.errstate(over="ignore"):
        return bool(np.array_equal(_bits(a.astype(np.float16).astype(np.float32)), _bits(a)))


def _code_bits(codes: np.ndarray) -> float:
    c = np.bincount((codes - codes.min()).ravel())
    return entropy.entropy_bits(c) / max(codes.size, 1)


def _candidates(x: np.ndarray):
    """Layouts (axis, B, form) that pass on a sample, best estimated size first, each with its sample's steps."""
    rng = np.random.default_rng(0)
    out = []
    for axis, b in _layouts(x):
        x2 = _as2d(x, axis)
        n_blocks = x.size // b
        idx = np.sort(rng.choice(n_blocks, min(n_blocks, max(8, min(SAMPLE, 4096 // b))), replace=False))
        rows = _sample_rows(x2, axis, b, idx)
        for form in ("scale", "affine"):
            ok, d, m, q = fit(rows, form, max_fail=1 - PASS)
            if ok.mean() < PASS:
                continue
            params = (1 if form == "scale" else 2) * (16 if _exact_fp16(d[ok]) and _exact_fp16(m[ok]) else 32)
            span = np.abs(rows[ok]).max(1) if form == "scale" else rows[ok].max(1) - rows[ok].min(1)
            with np.errstate(all="ignore"):
                steps = np.rint(span.astype(np.float64) / np.abs(d[ok].astype(np.float64)))
            values, counts = np.unique(steps[np.isfinite(steps) & (steps > 0)], return_counts=True)
            common = float(values[counts.argmax()]) if len(values) else None
            out.append((params / b + _code_bits(q[ok]), axis, b, form, common))
    return sorted(out, key=lambda c: c[0])


def _lines(q2: np.ndarray, axis: str) -> np.ndarray:
    """The codes (2-D, the leaf's layout) as rows of one index along the blocked axis: an input of a kernel, a
    column of an embedding."""
    return q2 if axis == "in" else np.ascontiguousarray(q2.T)


def _coded_bytes(counts: np.ndarray) -> np.ndarray:
    """The estimated bytes of streams with these histograms (rows, 256): the entropy bound plus the varint table
    over each stream's used range and its 21-byte header."""
    c = counts.astype(np.float64)
    n = c.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        bits = -np.nansum(np.where(c > 0, c * np.log2(c / n), 0.0), axis=1)
    used = c > 0
    lo, hi = used.argmax(1), 255 - used[:, ::-1].argmax(1)
    span = (np.arange(256) >= lo[:, None]) & (np.arange(256) <= hi[:, None])
    table = (span * (1 + (c >= 1 << 7) + (c >= 1 << 14) + (c >= 1 << 21))).sum(1)
    return bits / 8 + table + 21


def _code_section(lines: np.ndarray) -> bytes:
    """The codes (uint8 lines) as one stream, or as one stream per line (each with its own histogram: an
    embedding's columns differ) when that is estimated smaller; u32 count, u32 lengths, the streams."""
    n_lines, per = lines.shape
    streams = [lines.ravel()]
    if per >= CONTEXT_MIN and n_lines > 1:
        counts = np.zeros((n_lines, 256), np.int64)
        for i, line in enumerate(lines):
            counts[i] = np.bincount(line, minlength=256)
        if _coded_bytes(counts).sum() < _coded_bytes(counts.sum(0, keepdims=True))[0]:
            streams = list(lines)
    coded = [entropy.encode(line, 256) for line in streams]
    lengths = np.array([len(c) for c in coded], "<u4")
    return struct.pack("<I", len(coded)) + lengths.tobytes() + b"".join(coded)


def split_codes(data: bytes) -> list[bytes]:
    """The streams of a "codes" section, with their lengths checked."""
    if len(data) < 4:
        raise errors.CorruptData("an affine codes section is shorter than its header")
    (k,) = struct.unpack_from("<I", data, 0)
    if 4 + 4 * k > len(data):
        raise errors.CorruptData("an affine codes section ends inside its stream lengths")
    lengths = np.frombuffer(data, "<u4", k, 4).astype(np.int64)
    ends = 4 + 4 * k + np.cumsum(lengths)
    if k and ends[-1] != len(data):
        raise errors.CorruptData("an affine codes section's streams do not add up to its length")
    starts = ends - lengths
    return [data[a:e] for a, e in zip(starts, ends)]


def encode(x: np.ndarray, tries: int = 2):
    """(record fields, {section: bytes}) of a float32 leaf (ndim >= 2) as affine blocks (see the module
    docstring), or None when no layout reproduces it."""
    if x.dtype != np.float32 or x.ndim < 2 or x.size < MIN_SIZE:
        return None
    for _, axis, b, form, steps in _candidates(x)[:tries]:
        x2 = _as2d(x, axis)
        rows = _blocks(x2, axis, b)
        ok, d, m, q = fit(rows, form, steps, max_fail=MAX_EXCEPTIONS)
        if not ok.any() or (~ok).mean() > MAX_EXCEPTIONS:
            continue
        codes = q[ok]
        zero = -int(codes.min()) if codes.min() < 0 else 0
        if int(codes.max()) + zero > 255:
            continue
        sym = np.where(ok[:, None], q + zero, 0).astype(np.uint8)  # exception blocks: code 0, unused
        dt = {k: "float16" if _exact_fp16(v[ok]) else "float32" for k, v in (("scale", d), ("offset", m))}
        sections = {
            "codes": _code_section(_lines(_unblocks(sym, x2.shape, axis, b), axis)),
            "scale": floats.encode(d[ok].astype(dt["scale"])),
            "offset": floats.encode(m[ok].astype(dt["offset"])),
        }
        exc = np.flatnonzero(~ok)
        if len(exc):
            sections["where"] = entropy.varints(np.diff(exc, prepend=0))
            sections["raw"] = floats.encode(rows[exc])
        record = dict(
            axis=axis, block=b, zero=zero, scale_dtype=dt["scale"], offset_dtype=dt["offset"], exceptions=len(exc)
        )
        return record, sections
    return None


def decode(record: dict, sections: dict, shape) -> np.ndarray:
    """The float32 leaf of an "affine" record (CorruptData when its sections do not fit its record)."""
    axis, b, zero, n_exc = record["axis"], int(record["block"]), int(record["zero"]), int(record["exceptions"])
    size = int(np.prod(shape, dtype=np.int64))
    shape2 = (shape[0], size // shape[0]) if axis == "in" else (size // shape[-1], shape[-1])
    if axis not in ("in", "last") or b < 1 or size % b or (shape2[0] if axis == "in" else shape2[1]) % b:
        raise errors.CorruptData(f"{record['path']}: an affine block of {b} does not tile {tuple(shape)}")
    n_blocks = size // b
    n_ok = n_blocks - n_exc
    if not 0 <= n_exc <= n_blocks:
        raise errors.CorruptData(f"{record['path']}: {n_exc} exception blocks of {n_blocks}")
    missing = {"codes", "scale", "offset", *(("where", "raw") if n_exc else ())} - set(sections)
    if missing:
        raise errors.CorruptData(f"{record['path']}: affine sections {sorted(missing)} missing")
    d = floats.decode(sections["scale"], record["scale_dtype"], (n_ok,)).astype(np.float32)
    m = floats.decode(sections["offset"], record["offset_dtype"], (n_ok,)).astype(np.float32)
    lines = [entropy.decode(c) for c in split_codes(sections["codes"])]
    n_lines = shape2[0] if axis == "in" else shape2[1]
    if not (len(lines) == 1 and lines[0].size == size) and not (
        len(lines) == n_lines and all(c.size == size // n_lines for c in lines)
    ):
        raise errors.CorruptData(f"{record['path']}: {sum(c.size for c in lines)} codes in {len(lines)} streams")
    q2 = np.stack(lines).reshape(shape2 if axis == "in" else shape2[::-1])
    sym = _blocks(q2 if axis == "in" else q2.T, axis, b).astype(np.float32) - np.float32(zero)
    rows = np.empty((n_blocks, b), np.float32)
    if n_exc:
        where = np.cumsum(entropy.from_varints(sections["where"], n_exc).astype(np.int64))
        if (n_exc > 1 and np.any(np.diff(where) <= 0)) or where[-1] >= n_blocks:
            raise errors.CorruptData(f"{record['path']}: exception block indices out of order or range")
        keep = np.ones(n_blocks, bool)
        keep[where] = False
        rows[keep] = _rebuild(sym[keep], d, m)
        rows[where] = floats.decode(sections["raw"], "float32", (n_exc, b))
    else:
        rows[:] = _rebuild(sym, d, m)
    return _unblocks(rows, shape2, axis, b).reshape(shape)


# --- palettes ------------------------------------------------------------------------------------------------------


def palette_problems(x: np.ndarray, sample: int = 32) -> int | None:
    """The number of problems (per channel, or per block of B input entries) of a hint-less palette worth trying
    on a kernel (in, ...), or None: from `sample` sampled problems, the layout with the fewest estimated bits per
    weight (log2 of the distinct values per problem, plus their table at 32 bits an entry), if under
    `PALETTE_BITS`."""
    if x.ndim < 2 or x.size < MIN_SIZE or x.dtype.itemsize not in (2, 4):
        return None
    x2 = x.reshape(-1, x.shape[-1])  # (in, out) as `codebook.to_problems` sees it: a column or g entries of one
    n_in = x2.shape[0]
    rng = np.random.default_rng(0)
    best = None
    for g in (n_in, *(b for b in BLOCKS if b and b < n_in and n_in % b == 0)):
        n_problems = x.size // g
        idx = rng.choice(n_problems, min(sample, n_problems), replace=False)
        rows = np.sort(_sample_rows(x2, "in", g, idx).view(f"u{x.itemsize}"), axis=1)
        k = int((1 + (rows[:, 1:] != rows[:, :-1]).sum(1)).max())
        est = np.log2(max(k, 2)) + 32 * k / g
        if k <= 256 and est < PALETTE_BITS and (best is None or est < best[0]):
            best = (est, n_problems)
    return None if best is None else best[1]
