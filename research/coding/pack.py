"""Packing a model into the fewest bytes and back, exactly: per parameter leaf, the smallest exact representation.

Every leaf is stored as one of six kinds, each a few sections (see `container` for the file around them):

  float    the values, bit-exact (`floats`: exponent and sign/mantissa streams, entropy-coded)
  masked   the positions of the non-zero entries (`masks`) and those entries, bit-exact; an entry counts as zero
           only when its bits are those of +0.0, so -0.0 is kept as a value
  grid     integer codes on a quantization grid with its scales and zero points (value = (code - zero) * scale)
           or float minimums (code * scale + minimum), per tensor, output channel or group (`research.codes`);
           the codes either as one stream (positions and values coded together against their joint histogram) or
           as a mask plus the codes off the zero code, whichever is smaller (N:M masks favour the second)
  palette  indices into a per-problem table of values (a codebook per tensor, channel or group, the layouts of
           `research.codes`), the table bit-exact; again joint or mask + kept indices
  vectors  vector quantization (`codes.Vectors`): per residual stage one entropy-coded stream of the d-vectors'
           indices (of every vector, or of those with a kept weight when that is smaller), the pruned positions as a
           mask, and the tables of d-vectors bit-exact in the narrowest float type that holds them (float16 /
           bfloat16 / float32)
  affine   blocks of B weights along one axis, each exactly fl(fl(d * (q - z)) + m) with 8-bit codes q and a
           per-block scale d and offset m (fp16 when exact, else fp32), found with no hint (`found`): the weights of
           dequantized GGUF (Q4_0, Q4_1, Q8_0), GPTQ or AWQ checkpoints; blocks that fit no grid are stored raw

`encode_leaf` builds every kind that applies and keeps the smallest whose decoding gives back the leaf's exact bits
(so a representation can never change a weight: at worst a leaf falls back to `float`). What a leaf is comes from
the compression that made it: `core.export(transform, params, state)` gives a typed record per changed leaf
(`research.codes`), and a grid, palette or vectors record is stored as it is, nothing guessed from names or shapes. The
rest (dense leaves, and the kept values of masked ones) is searched: a leaf with at most 256 distinct values
becomes a per-tensor palette, a kernel whose sampled channels or blocks have few distinct values a palette per
channel or block (`found.palette_problems`), and every float32 leaf is searched for affine blocks (`found.encode`,
which gives up after a sample on leaves with no grid).

    records = core.export(transform, params, state)
    report = pack.pack(transform.apply(params, state), "model.zlm", meta=dict(model=cfg.to_dict()), exported=records)
    meta, params = pack.unpack("model.zlm")        # bit-identical to the packed params
"""

from __future__ import annotations

import warnings

import numpy as np
from flax import traverse_util
from tqdm.auto import tqdm

from research import codes, errors, tree
from research.coding import container, entropy, floats, found, maskcode

KINDS = ("float", "masked", "grid", "palette", "vectors", "affine")
CODED = ("grid", "palette", "vectors")  # the kinds that store a transform's record (`leaf_code`)
PALETTE_MAX = 256


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).view(f"u{x.dtype.itemsize}")


def _nonzero(x: np.ndarray) -> np.ndarray:
    return _bits(x) != 0  # +0.0 is the only all-zero bit pattern


def _palette_layout(shape, n_problems: int) -> codes.Layout | None:
    """The layout of a found palette of `n_problems` tables (`found.palette_problems`), or None."""
    size = int(np.prod(shape, dtype=np.int64))
    if n_problems == 1:
        return codes.Layout("tensor")
    if len(shape) >= 2 and n_problems == shape[-1]:
        return codes.Layout("channel")
    if len(shape) >= 2 and size % n_problems == 0 and (size // shape[-1]) % (size // n_problems) == 0:
        return codes.Layout("group", size // n_problems)
    return None


def _layout(record) -> codes.Layout:
    return codes.Layout.of(record["layout"], record["group"])


# --- the kinds ----------------------------------------------------------------------------------------------------


def _enc_float(x):
    return {}, {"values": floats.encode(x)}


def _enc_masked(x):
    keep = _nonzero(x)
    return {}, {"mask": maskcode.encode(keep), "values": floats.encode(x[keep])}


def _with_mask(record, symbols, keep, alphabet, joint: bool = True):
    """Two ways to store a symbol stream with zeros in it: joint (allowed when the symbols alone give the zeros),
    or mask + kept symbols; the smaller one (joint on a tie)."""
    if keep is None or keep.all():
        return dict(record, masked=False), {"symbols": entropy.encode(symbols.ravel(), alphabet)}
    split = {"mask": maskcode.encode(keep), "symbols": entropy.encode(symbols[keep], alphabet)}
    if joint:
        together = {"symbols": entropy.encode(symbols.ravel(), alphabet)}
        if len(together["symbols"]) <= sum(map(len, split.values())):
            return dict(record, masked=False), together
    return dict(record, masked=True), split


CENTER = 255  # integer-zero grid codes are stored as code - zero + CENTER (0..510)


def _enc_grid(x, code: codes.Grid):
    """The sections of an exported grid: its codes (joint, or mask + the codes off the zero code), scales and
    zero points (integer codes) or float minimums.

    With integer zero points two forms are built and the smaller kept: the raw codes with their zero points, or
    the signed levels code - zero (shifted by CENTER) alone, which give the values (level * scale) without the
    zero points (an asymmetric grid's per-group zeros cost ~2% of a 4-bit g32 kernel, and its levels may code
    smaller or larger than its codes)."""
    c = np.asarray(code.codes).reshape(x.shape).astype(np.int64)
    s = np.asarray(code.scale, np.float32)
    lay = code.layout
    params = [s, np.asarray(code.zero, np.float32)] if code.float_zero else [s]
    half = all(_fp16_exact(a) for a in params)  # GGUF-style fp16 scales and minimums: stored in 2 bytes
    store = (lambda a: floats.encode(a.astype(np.float16))) if half else floats.encode
    record = dict(lay.to_dict(), scale_shape=list(s.shape), zero="float" if code.float_zero else "integer")
    if half:
        record["param_dtype"] = "float16"
    if code.float_zero:
        record, sections = _with_mask(record, c, None, 256)
        sections["offset"] = store(params[1])
    else:
        z = np.asarray(code.zero).astype(np.int64)
        z_full = np.broadcast_to(lay.expand(z, x.shape), x.shape)
        raw_record, raw = _with_mask(record, c, c != z_full, 256)
        raw["zero"] = entropy.encode(z.ravel(), 256)
        levels = c - z_full + CENTER
        record, sections = _with_mask(dict(record, centered=True), levels, levels != CENTER, 2 * CENTER + 1)
        if sum(map(len, raw.values())) <= sum(map(len, sections.values())):
            record, sections = raw_record, raw
    sections["scale"] = store(s)
    return record, sections


def _fp16_exact(a: np.ndarray) -> bool:
    """Whether every float32 value of `a` is a float16 value (bit for bit back)."""
    return codes.same_bits(a.astype(np.float16).astype(np.float32), a)


def _enc_palette(x, pal: codes.Palette, joint: bool):
    """The sections of a palette: its indices (joint when `joint`, else or when smaller mask + kept indices) and
    its tables in the leaf's dtype."""
    table = np.asarray(pal.table)
    if table.dtype != x.dtype:
        table = table.astype(x.dtype)
    keep = None if pal.keep is None else np.asarray(pal.keep).reshape(x.shape)
    k = table.shape[1]
    idx = np.asarray(pal.indices).reshape(x.shape).astype(np.int64)
    record, sections = _with_mask(dict(pal.layout.to_dict(), k=k), idx, keep, k, joint=joint)
    sections["entries"] = floats.encode(table)
    return record, sections


TABLE_DTYPES = ("float16", "bfloat16", "float32")


def _narrowest(a: np.ndarray) -> str:
    """The first of TABLE_DTYPES that holds every float32 value of `a` bit for bit."""
    for name in TABLE_DTYPES[:-1]:
        if codes.same_bits(a.astype(floats._numpy_dtype(name)).astype(np.float32), a):
            return name
    return "float32"


def _live_vectors(keep: np.ndarray, lay: codes.Layout, dim: int) -> np.ndarray:
    """(*grid) bool: the vectors with at least one kept weight (the others' indices carry nothing)."""
    live = codes.to_vectors(keep, lay, dim).any(-1)  # (P, m)
    return lay.from_problems(live, codes.vector_grid(keep.shape, lay, dim))


def _enc_vectors(x, vec: codes.Vectors):
    """The sections of vectors: a mask when weights are pruned, one index stream per stage (of every vector, or of
    the vectors with a kept weight when that is smaller) and the tables in their narrowest exact float type."""
    idx = np.asarray(vec.indices).astype(np.int64)  # (S, *grid)
    table = np.asarray(vec.table, np.float32)  # (S, P, k, d)
    keep = None if vec.keep is None else np.asarray(vec.keep).reshape(x.shape)
    n_stages, _, k, dim = table.shape
    tdtype = _narrowest(table)
    record = dict(vec.layout.to_dict(), k=k, dim=dim, stages=n_stages, table_dtype=tdtype, masked=False)
    streams = {f"indices{s}": entropy.encode(idx[s].ravel(), k) for s in range(n_stages)}
    sections = {}
    if keep is not None and not keep.all():
        sections["mask"] = maskcode.encode(keep)
        live = _live_vectors(keep, vec.layout, dim)
        kept = {f"indices{s}": entropy.encode(idx[s][live], k) for s in range(n_stages)}
        if sum(map(len, kept.values())) < sum(map(len, streams.values())):
            record["masked"], streams = True, kept
    sections.update(streams)
    sections["entries"] = floats.encode(table.astype(floats._numpy_dtype(tdtype)))
    return record, sections


def _found_palette(x, n_problems) -> codes.Palette | None:
    """A palette of the distinct values of each problem (per tensor, channel or block), or None when a problem
    has more than PALETTE_MAX; `keep` marks the non-zero entries (0.0 is an entry of its table)."""
    lay = _palette_layout(x.shape, n_problems)
    if lay is None:
        return None
    u = lay.to_problems(_bits(x))  # (P, n) bit patterns
    s = np.sort(u, axis=1)
    distinct = np.concatenate([np.ones((s.shape[0], 1), bool), s[:, 1:] != s[:, :-1]], axis=1)
    k = int(distinct.sum(1).max())
    if k > PALETTE_MAX:
        return None
    entries = np.zeros((s.shape[0], k), s.dtype)
    rows, cols = np.nonzero(distinct)
    entries[rows, np.cumsum(distinct, axis=1)[rows, cols] - 1] = s[rows, cols]
    counts = distinct.sum(1)
    entries = np.where(
        np.arange(k)[None] < counts[:, None], entries, entries[np.arange(len(entries)), counts - 1, None]
    )
    idx = lay.from_problems(_rowwise_search(entries, u), x.shape)
    return codes.Palette(idx, entries.view(x.dtype), lay, _nonzero(x))


def _rowwise_search(entries, u):
    """searchsorted of every row of u (P, n) in the matching sorted row of entries (P, k)."""
    off = np.arange(len(u), dtype=np.uint64)[:, None] << np.uint64(32)
    flat = (entries.astype(np.uint64) + off).ravel()
    pos = np.searchsorted(flat, (u.astype(np.uint64) + off).ravel()).reshape(u.shape)
    return pos - np.arange(len(u))[:, None] * entries.shape[1]


# --- decoding ------------------------------------------------------------------------------------------------------


def _symbols(record, sections, shape):
    n = int(np.prod(shape, dtype=np.int64))
    sym = entropy.decode(sections["symbols"]).astype(np.int64, copy=False)  # raw streams come back unsigned
    if not record["masked"]:
        if sym.size != n:
            raise errors.CorruptData(f"{record['path']}: {sym.size} symbols for {n} values")
        return sym.reshape(shape), None
    keep = maskcode.decode(sections["mask"], shape)
    if sym.size != int(keep.sum()):
        raise errors.CorruptData(f"{record['path']}: {sym.size} symbols for {int(keep.sum())} kept values")
    return sym, keep


def _vectors_code(record: dict, sections: dict, shape: tuple) -> codes.Vectors:
    lay, k, dim, n_stages = _layout(record), record["k"], record["dim"], record["stages"]
    grid = codes.vector_grid(shape, lay, dim)
    table = floats.decode(sections["entries"], record["table_dtype"], (n_stages, lay.n_problems(grid), k, dim))
    keep = maskcode.decode(sections["mask"], shape) if "mask" in sections else None
    live = _live_vectors(keep, lay, dim) if record["masked"] else np.ones(grid, bool)
    idx = np.zeros((n_stages, *grid), np.int64)
    for s in range(n_stages):
        sym = entropy.decode(sections[f"indices{s}"]).astype(np.int64, copy=False)
        if sym.size != int(live.sum()):
            raise errors.CorruptData(f"{record['path']}: {sym.size} stage-{s} indices for {int(live.sum())} vectors")
        idx[s][live] = sym
    if idx.size and idx.max() >= k:
        raise errors.CorruptData(f"{record['path']}: a vector index past its table")
    return codes.Vectors(idx.astype(np.uint8 if k <= 256 else np.uint16), table.astype(np.float32), lay, keep)


def leaf_code(record: dict, sections: dict) -> codes.Grid | codes.Palette | codes.Vectors:
    """The code record a grid, palette or vectors leaf stores (what a transform exported; a levels-only grid gets
    the smallest zero points that make its codes non-negative), so a packed model packs again as it was."""
    shape = tuple(record["shape"])
    if record["kind"] == "vectors":
        return _vectors_code(record, sections, shape)
    lay = _layout(record)
    sym, keep = _symbols(record, sections, shape)
    if record["kind"] == "palette":
        k = record["k"]
        entries = floats.decode(sections["entries"], record["dtype"], (lay.n_problems(shape), k))
        idx = sym if keep is None else np.zeros(shape, np.int64)
        if keep is not None:
            idx[keep] = sym
        if idx.size and idx.max() >= k:
            raise errors.CorruptData(f"{record['path']}: a palette index past its table")
        return codes.Palette(idx.astype(np.uint8), entries, lay, keep)
    pdtype = record.get("param_dtype", "float32")
    scale = floats.decode(sections["scale"], pdtype, tuple(record["scale_shape"])).astype(np.float32)
    float_zero = record.get("zero", "integer") == "float"
    if record.get("centered"):  # levels code - zero alone: value = level * scale
        levels = sym.reshape(shape) - CENTER if keep is None else np.zeros(shape, np.int64)
        if keep is not None:
            levels[keep] = sym - CENTER
        zero = np.maximum(-_group_min(levels, lay, scale.shape), 0)
        c = levels + np.broadcast_to(lay.expand(zero, shape), shape)
    else:
        if float_zero:
            zero = floats.decode(sections["offset"], pdtype, scale.shape).astype(np.float32)
        else:
            zero = entropy.decode(sections["zero"]).astype(np.int64).reshape(scale.shape)
        c = sym.reshape(shape) if keep is None else np.broadcast_to(lay.expand(zero, shape), shape).astype(np.int64)
        if keep is not None:  # entries off the mask take the zero code
            c[keep] = sym
    if c.size and (c.min() < 0 or c.max() > 255):
        raise errors.CorruptData(f"{record['path']}: grid codes outside 0..255")
    return codes.Grid(c.astype(np.uint8), scale, np.asarray(zero, np.float32), lay, float_zero)


def _group_min(levels: np.ndarray, lay: codes.Layout, pshape) -> np.ndarray:
    """The smallest level of every group of a grid's layout (the grid parameters' shape `pshape`)."""
    if lay.transposed:
        return _group_min(levels.T, lay.columns, pshape)
    if lay.granularity == "tensor":
        return np.asarray(levels.min() if levels.size else 0).reshape(pshape)
    if lay.granularity == "channel":
        return levels.min(axis=0)
    g, n_in = lay.group_size, levels.shape[0]
    pad = -n_in % g
    padded = np.pad(levels, ((0, pad),) + ((0, 0),) * (levels.ndim - 1), mode="edge") if pad else levels
    return padded.reshape(-1, g, *levels.shape[1:]).min(axis=1)


# The fields each kind's record must have (besides path, shape, dtype, kind, crc32, sections), with their checks:
# the header schema every reader relies on, checked before anything is decoded or reported.
def _is_dtype(v) -> bool:
    return v in container.LEAF_DTYPES


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_positive(v) -> bool:
    return _is_count(v) and v >= 1


def _is_bool(v) -> bool:
    return isinstance(v, bool)


_LAYOUT = {"layout": lambda v: v in codes.GRANULARITIES, "group": _is_count}
SCHEMA = {
    "float": ({}, {"values"}),
    "masked": ({}, {"mask", "values"}),
    "grid": (
        {
            **_LAYOUT,
            "masked": _is_bool,
            "scale_shape": lambda v: isinstance(v, list) and len(v) <= 8 and all(map(_is_count, v)),
            "zero?": lambda v: v in ("integer", "float"),
            "centered?": _is_bool,
            "param_dtype?": _is_dtype,
        },
        {"symbols", "scale"},
    ),
    "palette": ({**_LAYOUT, "masked": _is_bool, "k": _is_positive}, {"symbols", "entries"}),
    "vectors": (
        {
            **_LAYOUT,
            "masked": _is_bool,
            "k": _is_positive,
            "dim": _is_positive,
            "stages": _is_positive,
            "table_dtype": _is_dtype,
        },
        {"entries"},
    ),  # fmt: skip
    "affine": (
        {
            "axis": lambda v: v in ("in", "last"),
            "block": _is_positive,
            "zero": _is_count,
            "exceptions": _is_count,
            "scale_dtype": _is_dtype,
            "offset_dtype": _is_dtype,
        },
        {"codes", "scale", "offset"},
    ),  # fmt: skip
}


def check_leaf(leaf: dict, where) -> None:
    """A leaf record against `SCHEMA` (CorruptData naming the field): its kind, the fields its kind needs, a
    layout `codes.Layout` accepts, and the sections it must have."""
    kind = leaf["kind"]
    if kind not in SCHEMA:
        raise errors.CorruptData(f"{where}: {leaf['path']} has unknown kind {kind!r} (the file is damaged)")
    fields, sections = SCHEMA[kind]
    for name, ok in fields.items():
        optional, key = name.endswith("?"), name.rstrip("?")
        if (key in leaf or not optional) and not ok(leaf.get(key)):
            raise errors.CorruptData(f"{where}: {leaf['path']} ({kind}) has {key} {leaf.get(key)!r} (damaged)")
    if "layout" in fields:
        try:
            codes.Layout.of(leaf["layout"], leaf["group"])
        except ValueError as e:
            raise errors.CorruptData(f"{where}: {leaf['path']} has an invalid layout ({e})") from None
    missing = sections - set(leaf["sections"])
    if missing:
        raise errors.CorruptData(f"{where}: {leaf['path']} ({kind}) lacks section(s) {sorted(missing)} (damaged)")


def open_file(path) -> container.Reader:
    """A `container.Reader` of a packed file whose every leaf record passed `check_leaf`."""
    r = container.Reader(path)
    for leaf in r.leaves:
        check_leaf(leaf, r.path)
    return r


def codes_of(path) -> dict:
    """{leaf path: code record} of the grid, palette and vectors leaves of a packed file (see `leaf_code`)."""
    r = open_file(path)
    return {
        leaf["path"]: leaf_code(leaf, {name: r.section(leaf, name) for name in leaf["sections"]})
        for leaf in r.leaves
        if leaf["kind"] in CODED
    }


def decode_leaf(record: dict, sections: dict) -> np.ndarray:
    """A leaf from its header record and section bytes (CorruptData when they do not fit together)."""
    shape, dtype, kind = tuple(record["shape"]), record["dtype"], record["kind"]
    if kind == "float":
        return floats.decode(sections["values"], dtype, shape)
    if kind == "masked":
        keep = maskcode.decode(sections["mask"], shape)
        out = np.zeros(shape, floats._numpy_dtype(dtype))
        out[keep] = floats.decode(sections["values"], dtype, (int(keep.sum()),))
        return out
    if kind in CODED:
        return codes.decode(leaf_code(record, sections)).astype(floats._numpy_dtype(dtype))
    if kind == "affine":
        return found.decode(record, sections, shape)
    raise errors.CorruptData(f"{record['path']}: unknown leaf kind {kind!r}")


# --- choosing ------------------------------------------------------------------------------------------------------


def encode_leaf(path: str, x, code: codes.Code | None = None) -> tuple[dict, dict]:
    """(record, {section: bytes}) of the smallest exact representation of one leaf (see the module docstring).

    Args:
      path: the leaf's path (for messages and the header).
      x: the leaf.
      code: what a transform exported for it (`research.codes`), or None. A grid or palette is stored as it is
        (no search); a mask, or no code, leaves the values to the search. A code that does not give the leaf's
        exact bits is ignored with a warning (the leaf is searched as if none had been exported).
    """
    x = np.asarray(x)
    name = floats.dtype_name(x)
    base = dict(path=path, shape=list(x.shape), dtype=name, crc32=container.crc(np.ascontiguousarray(x).tobytes()))
    x1 = x.reshape(x.shape or (1,))
    candidates = [("float", _enc_float(x1))]
    if x1.size and np.any(~_nonzero(x1)):
        candidates.append(("masked", _enc_masked(x1)))
    checked = None  # the exported grid / palette / vectors, checked once from its own bytes
    if isinstance(code, codes.Grid | codes.Palette | codes.Vectors):
        kind = {codes.Grid: "grid", codes.Palette: "palette", codes.Vectors: "vectors"}[type(code)]
        if _fits(code, x.shape):
            if kind == "vectors":
                built = _enc_vectors(x1, code)
            else:
                built = _enc_grid(x1, code) if kind == "grid" else _enc_palette(x1, code, joint=code.keep is None)
            if _gives(dict(base, kind=kind, **built[0]), built[1], x1):
                checked = len(candidates)
                candidates.append((kind, built))
        if checked is None:
            warnings.warn(
                f"{path}: its exported {type(code).__name__} code does not give its values; searched instead",
                stacklevel=2,
            )
    if checked is None:  # no code, a mask (the kept values are the leaf's own floats), or a code that failed
        n_problems = None
        if x1.size and len(np.unique(_bits(x1.ravel()[:65536]))) <= PALETTE_MAX:
            n_problems = 1
        if n_problems is None:
            n_problems = found.palette_problems(x1)
        pal = _found_palette(x1, n_problems) if n_problems else None
        if pal is not None:
            candidates.append(("palette", _enc_palette(x1, pal, joint=True)))
        candidates.append(("affine", found.encode(x1)))
    built = [(sum(map(len, b[1].values())), i, kind, b) for i, (kind, b) in enumerate(candidates) if b is not None]
    for _, i, kind, (extra, sections) in sorted(built, key=lambda c: c[:2]):  # smallest first, ties: listed first
        record = dict(base, kind=kind, **extra)
        if i == checked or _gives(record, sections, x1):
            break
    else:
        raise RuntimeError(f"{path}: no representation decodes to the leaf's bits")  # float always does
    record["bounds"] = _bounds(sections)
    return record, sections


def _fits(code, shape) -> bool:
    """Whether a record's codes have the shape a leaf of `shape` needs."""
    if isinstance(code, codes.Grid):
        return np.shape(code.codes) == shape
    if isinstance(code, codes.Palette):
        return np.shape(code.indices) == shape
    try:
        grid = codes.vector_grid(shape, code.layout, code.dim)
    except ValueError:
        return False
    table = np.shape(code.table)
    return np.shape(code.indices) == (table[0], *grid) and table[1] == code.layout.n_problems(grid)


def _gives(record: dict, sections: dict, x: np.ndarray) -> bool:
    """Whether the record and its sections decode to exactly the bits of `x`."""
    try:
        return codes.same_bits(decode_leaf(record, sections), x)
    except errors.CorruptData:
        return False


def _bounds(sections) -> dict:
    """Per section, (the empirical-entropy bound, the Huffman code length) in bits of its symbol streams, tables
    excluded: the limit the coded size is compared with, and what Deep Compression's coder would take. The
    histograms come from the streams' stored tables, so nothing is decoded again."""
    out = {}
    for name, data in sections.items():
        if name in ("values", "scale", "entries", "offset", "raw"):
            streams = [entropy.counts(s) for s in floats.split(data)]
        elif name == "codes":  # affine: one stream, or one per line
            streams = [entropy.counts(s) for s in found.split_codes(data)]
        elif name == "where":  # varints, not a symbol stream
            continue
        elif name == "mask":
            streams = [entropy.counts(data[1:])]
        else:
            streams = [entropy.counts(data)]
        bound = sum(entropy.entropy_bits(c) for c in streams)  # of the streams as coded (a mask: its groups)
        out[name] = (bound, sum(entropy.huffman_bits(c) for c in streams))
    return out


# --- trees ---------------------------------------------------------------------------------------------------------


def pack(params, path, *, meta: dict, exported: dict | None = None, overwrite: bool = False, progress=None) -> dict:
    """Packs a parameter tree into one file; returns the report (see `report`).

    Args:
      params: nested dict of float32 / bfloat16 / float16 arrays: the effective parameters.
      path: the output file (written atomically; an existing one needs `overwrite`).
      meta: JSON-able metadata stored in the header (model config, tokenizer, source, ...).
      exported: {path: record} of what the compression made of each leaf (`core.export`); None: every leaf
        searched.
      progress: show a progress bar (None: when attached to a terminal).
    """
    flat = tree.flatten(params)
    exported = exported or {}
    unknown = sorted(set(exported) - set(flat))
    if unknown:
        raise ValueError(f"codes for leaves the parameters do not have: {unknown[:3]}")
    records, blobs = [], []
    for p, x in tqdm(flat.items(), desc="pack", disable=None if progress is None else not progress, leave=False):
        record, sections = encode_leaf(p, np.asarray(x), exported.get(p))
        records.append(record)
        blobs.append(sections)
    container.write(path, meta, records, blobs, overwrite=overwrite)
    return report(open_file(path))


def unpack(path, *, verify: bool = True) -> tuple[dict, dict]:
    """(meta, params as a nested dict of NumPy arrays) of a packed file, every checksum checked."""
    r = open_file(path)
    if verify:
        r.verify()
    out: dict = {}
    for leaf in r.leaves:
        sections = {name: r.section(leaf, name) for name in leaf["sections"]}
        try:
            x = decode_leaf(leaf, sections)
        except errors.UserError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError, OverflowError, MemoryError) as e:
            # Every section passed its CRC, so the record itself is inconsistent: damaged, or crafted.
            raise errors.CorruptData(
                f"{r.path}: the record of {leaf['path']} does not describe its sections ({type(e).__name__}: {e})"
            ) from None
        if container.crc(np.ascontiguousarray(x).tobytes()) != leaf["crc32"]:
            raise errors.CorruptData(f"{r.path}: {leaf['path']} decodes to the wrong values (checksum mismatch)")
        out[tuple(int(k) if k.isdigit() else k for k in leaf["path"].split("/"))] = x
    return r.meta, traverse_util.unflatten_dict(out)


def report(reader: container.Reader) -> dict:
    """Sizes from the header alone: bytes per kind and section, bits per weight, the entropy bound, the Huffman
    code of the same streams (Deep Compression's coder, tables not counted), and the compression ratio against
    float32 and bfloat16 with every byte of the file (header, tables, checksums) counted."""
    n = sum(int(np.prod(leaf["shape"], dtype=np.int64)) for leaf in reader.leaves)
    by_kind: dict = {}
    sections: dict = {}
    bound, huffman = 0.0, 0
    for leaf in reader.leaves:
        k = by_kind.setdefault(leaf["kind"], dict(leaves=0, values=0, bytes=0))
        k["leaves"] += 1
        k["values"] += int(np.prod(leaf["shape"], dtype=np.int64))
        for name, s in leaf["sections"].items():
            k["bytes"] += s["length"]
            sec = sections.setdefault(name, dict(bytes=0, bound_bits=0.0, huffman_bits=0))
            sec["bytes"] += s["length"]
            sec["bound_bits"] += s["bound_bits"] or 0.0
            sec["huffman_bits"] += s.get("huffman_bits") or 0
            bound += s["bound_bits"] or 0.0
            huffman += s.get("huffman_bits") or 0
    total = reader.size
    return dict(
        file=str(reader.path),
        params=n,
        file_bytes=total,
        overhead_bytes=total - sum(k["bytes"] for k in by_kind.values()),
        bits_per_weight=8 * total / max(n, 1),
        bound_bytes=bound / 8,
        bound_bits_per_weight=bound / max(n, 1),
        huffman_bytes=huffman / 8,
        ratio_vs_fp32=4 * n / total,
        ratio_vs_bf16=2 * n / total,
        kinds=by_kind,
        sections=sections,
    )
