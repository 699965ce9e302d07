"""Packing: every Transform type and chains of them unpack to bit-identical effective parameters (and the same
loss); random pytrees round-trip; damaged files fail with a clear error, never with wrong weights."""

import dataclasses
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from research import codes, errors, models, tree
from research.coding import container, pack
from research.compress import calib, core, pipeline, registry
from research.models import config as model_config
from research.train import step as train_step


def _tiny():
    cfg = model_config.gpt2_style(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=16)
    graphdef, params = models.init(cfg, seed=0)
    return cfg, graphdef, params


def _same_bits(a, b):
    fa, fb = tree.flatten(a), tree.flatten(b)
    assert set(fa) == set(fb)
    for p in fa:
        x, y = np.asarray(fa[p]), np.asarray(fb[p])
        assert x.shape == y.shape and x.dtype == y.dtype, p
        assert np.array_equal(x.view(f"u{x.dtype.itemsize}"), y.view(f"u{y.dtype.itemsize}")), p


METHODS = [
    [dict(method="magnitude", sparsity=0.5)],
    [dict(method="random", sparsity=0.3)],
    [dict(method="magnitude", sparsity=0.5, pattern="2:4")],
    [dict(method="wanda", sparsity=0.5)],
    [dict(method="sparsegpt", sparsity=0.5)],
    [dict(method="snip", sparsity=0.4)],
    [dict(method="structured", neurons=0.5, head_dim=16)],
    [dict(method="codebook", bits=3, granularity="channel")],
    [dict(method="codebook", bits=2, granularity="group", group_size=16, entry_dtype="int8")],
    [dict(method="rtn", bits=4, granularity="tensor")],
    [dict(method="rtn", bits=3, granularity="group", group_size=16, symmetric=False)],
    [dict(method="gptq", bits=4, granularity="channel")],
    [dict(method="rtn", bits=4, granularity="group", group_size=32, zero="float", param_dtype="float16")],  # Q4_1
    [dict(method="qat", bits=4, learn_scale=True)],
    [dict(method="magnitude", sparsity=0.5), dict(method="codebook", bits=4)],
    [dict(method="vq", bits=4, dim=4, stages=2)],
    [dict(method="magnitude", sparsity=0.5), dict(method="vq", bits=6, dim=2, iters=20)],
    [
        dict(method="sparsegpt", sparsity=0.5, pattern="2:4"),
        dict(method="gptq", bits=4, granularity="group", group_size=16),
    ],
    [
        dict(method="magnitude", sparsity=0.5),
        dict(method="codebook", bits=4, granularity="channel"),
        dict(method="qat", bits=8),
    ],
]


@pytest.mark.filterwarnings("error")  # an exported code that does not give the weights warns: a failure here
@pytest.mark.parametrize("specs", METHODS, ids=lambda s: "+".join(x["method"] for x in s))
def test_every_transform_exports_codes_that_unpack_bit_identically(specs, tmp_path):
    cfg, graphdef, params = _tiny()
    tokens = np.asarray(jax.random.randint(jax.random.key(0), (4000,), 0, 64), np.int32)
    data = calib.Calibration(graphdef, calib.sample(tokens, 8, 16, 0, 16), 8)
    t = pipeline.build(specs)
    state = t.init(params, jax.random.key(1), data if any(registry.needs_calibration(s) for s in specs) else None)
    effective = jax.tree.map(np.asarray, t.apply(params, state))
    exported = core.export(t, params, state)
    out = tmp_path / "m.zlm"
    rep = pack.pack(effective, out, meta={"model": cfg.to_dict()}, exported=exported)
    meta, back = pack.unpack(out)
    _same_bits(effective, back)
    batch = {"inputs": jnp.asarray(tokens[:64].reshape(4, 16)), "targets": jnp.asarray(tokens[1:65].reshape(4, 16))}
    loss = lambda p: float(train_step.loss_fn(jax.tree.map(jnp.asarray, p), graphdef, batch))  # noqa: E731
    assert loss(back) == loss(effective)
    kinds = {leaf["path"]: leaf["kind"] for leaf in container.Reader(out).leaves}
    want = {"rtn": codes.Grid, "gptq": codes.Grid, "qat": codes.Grid, "codebook": codes.Palette, "vq": codes.Vectors}
    want = want.get(specs[-1]["method"], codes.Masked)
    assert exported and all(isinstance(c, want) for c in exported.values())
    for path in exported:  # a grid or palette is stored as itself (a mask leaves the values searched)
        if want is codes.Grid:
            assert kinds[path] == "grid", path
        if want is codes.Palette:
            assert kinds[path] == "palette", path
        if want is codes.Vectors:
            assert kinds[path] == "vectors", path
    assert rep["ratio_vs_fp32"] > 1.0


@st.composite
def pytrees(draw):
    """Leaves of every kind with their codes as a transform would export them, in rectangular shapes with
    groups that need not divide the inputs (a grid's last group is then shorter)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    leaves, exported = {}, {}
    for i in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["float", "masked", "codebook", "grid", "float_grid", "special"]))
        shape = (draw(st.sampled_from([4, 8, 13, 16])), draw(st.integers(1, 6)))
        x = rng.normal(0, 0.05, shape).astype(np.float32)
        if kind == "masked":
            x[rng.random(shape) < draw(st.floats(0.0, 1.0))] = 0.0
        elif kind == "codebook":
            k = draw(st.integers(1, 8))
            lay = codes.Layout("channel")
            pal = codes.Palette(
                rng.integers(0, k, shape).astype(np.uint8),
                rng.normal(0, 0.05, (shape[1], k)).astype(np.float32),
                lay,
                rng.random(shape) > 0.3 if draw(st.booleans()) else None,
            )
            x = codes.decode(pal)
            exported[f"l{i}/kernel"] = pal
        elif kind in ("grid", "float_grid"):
            g = draw(st.sampled_from(["tensor", "channel", "group"]))
            lay = codes.Layout(g, 3 if g == "group" else 0)
            pshape = lay.param_shape(shape)
            scale = rng.uniform(0.001, 0.1, pshape).astype(np.float32)
            if kind == "grid":
                zero = rng.integers(0, 16, pshape).astype(np.uint8)
            else:
                zero = rng.normal(0, 0.1, pshape).astype(np.float32)
            code = codes.Grid(rng.integers(0, 16, shape).astype(np.uint8), scale, zero, lay, kind == "float_grid")
            x = codes.decode(code)
            exported[f"l{i}/kernel"] = code
        elif kind == "special":
            bits = rng.integers(0, 2**32, shape, dtype=np.uint64).astype(np.uint32)
            bits.ravel()[:3] = [0x80000000, 0x7FC00001, 0x00000001][: bits.size]  # -0.0, a NaN payload, a subnormal
            x = bits.view(np.float32)
        leaves[f"l{i}"] = {"kernel": x}
    return leaves, exported


@pytest.mark.filterwarnings("error")
@given(pytrees())
@settings(max_examples=40, deadline=None)
def test_random_pytrees_round_trip(tmp_path_factory, case):
    params, exported = case
    out = tmp_path_factory.mktemp("p") / "r.zlm"
    pack.pack(params, out, meta={}, exported=exported)
    _, back = pack.unpack(out)
    _same_bits(params, back)
    kinds = {leaf["path"]: leaf["kind"] for leaf in container.Reader(out).leaves}
    for path, code in exported.items():  # an exported code is stored as itself unless plain floats are smaller
        assert kinds[path] in (("grid" if isinstance(code, codes.Grid) else "palette"), "float", "masked")


def test_a_code_that_does_not_give_the_weights_is_searched_with_a_warning(tmp_path):
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(16, 4)
    wrong = codes.Grid(
        np.zeros((16, 4), np.uint8), np.ones((4,), np.float32), np.zeros((4,), np.float32), codes.Layout("channel")
    )
    with pytest.warns(UserWarning, match="l/kernel: its exported Grid code does not give its values"):
        pack.pack({"l": {"kernel": x}}, tmp_path / "w.zlm", meta={}, exported={"l/kernel": wrong})
    _, back = pack.unpack(tmp_path / "w.zlm")
    _same_bits({"l": {"kernel": x}}, back)
    with pytest.raises(ValueError, match="codes for leaves the parameters do not have"):
        pack.pack({"l": {"kernel": x}}, tmp_path / "u.zlm", meta={}, exported={"m/kernel": wrong})


@pytest.fixture
def packed_file(tmp_path):
    _, _, params = _tiny()
    t = pipeline.build([dict(method="magnitude", sparsity=0.5), dict(method="rtn", bits=4)])
    state = t.init(params, jax.random.key(0), None)
    effective = jax.tree.map(np.asarray, t.apply(params, state))
    out = tmp_path / "m.zlm"
    pack.pack(effective, out, meta={"note": "test"}, exported=core.export(t, params, state))
    return out, effective


def _damaged(path, fn, tmp_path):
    data = bytearray(path.read_bytes())
    fn(data)
    bad = tmp_path / "bad.zlm"
    bad.write_bytes(bytes(data))
    return bad


def _flip(pos):
    def fn(d):
        d[pos] ^= 0x10

    return fn


def test_damaged_files_fail_clearly_never_with_wrong_weights(packed_file, tmp_path):
    path, _ = packed_file
    size = path.stat().st_size
    (hlen,) = struct.unpack_from("<Q", path.read_bytes(), 12)
    r = container.Reader(path)
    leaf = r.leaves[3]
    section = next(iter(leaf["sections"].values()))
    in_section = r.data_start + section["offset"] + section["length"] // 2
    cases = {
        "too short": (lambda d: d.__delitem__(slice(10, None)), "too short"),
        "wrong magic": (lambda d: d.__setitem__(slice(0, 8), b"NOTZIPLM"), "wrong magic"),
        "wrong version": (lambda d: d.__setitem__(slice(8, 10), struct.pack("<H", 7)), "format version 7"),
        "header length past the end": (lambda d: d.__setitem__(slice(12, 20), struct.pack("<Q", 10**9)), "truncated"),
        "flipped header bit": (_flip(20 + hlen // 2), "header fails its checksum"),
        "truncated": (lambda d: d.__delitem__(slice(size - 100, None)), "truncated or damaged"),
        "flipped section bit": (_flip(in_section), f"of {leaf['path']} fails its checksum"),
        "flipped footer bit": (_flip(size - 20), "SHA-256"),
    }
    for fn, match in cases.values():
        bad = _damaged(path, fn, tmp_path)
        with pytest.raises(errors.CorruptData, match=match):
            pack.unpack(bad)
    # Without the whole-file hash, a damaged section is caught by its own CRC, before anything is decoded.
    with pytest.raises(errors.CorruptData, match=f"section .* of {leaf['path']} fails its checksum"):
        pack.unpack(_damaged(path, _flip(in_section), tmp_path), verify=False)


def test_a_section_past_the_end_is_refused(packed_file, tmp_path):
    import json
    import zlib

    path, _ = packed_file
    data = path.read_bytes()
    (hlen,) = struct.unpack_from("<Q", data, 12)
    header = json.loads(zlib.decompress(data[20 : 20 + hlen]))
    next(iter(header["leaves"][0]["sections"].values()))["length"] = 10**9
    raw = zlib.compress(json.dumps(header).encode())
    rebuilt = data[:12] + struct.pack("<Q", len(raw)) + raw + struct.pack("<I", container.crc(raw)) + data[24 + hlen :]
    bad = tmp_path / "long.zlm"
    bad.write_bytes(rebuilt)
    with pytest.raises(errors.CorruptData, match="runs past the end of the file"):
        container.Reader(bad)


def _rename(d: dict, old: str, new: str) -> None:
    """Renames a key in place, keeping the order (the sections' order is their order in the file)."""
    items = [(new if k == old else k, v) for k, v in d.items()]
    d.clear()
    d.update(items)


def test_crafted_headers_with_valid_checksums_are_refused(packed_file, tmp_path):
    import copy
    import zlib

    path, _ = packed_file
    data = path.read_bytes()
    header = container.header_of(data)
    grid = next(i for i, leaf in enumerate(header["leaves"]) if leaf["kind"] == "grid")

    def edit(fn):
        h = copy.deepcopy(header)
        fn(h)
        return h

    def first_section(h, i=0):
        return next(iter(h["leaves"][i]["sections"].values()))

    cases = {
        "no leaves": (edit(lambda h: h.pop("leaves")), "lacks its meta record or leaf list"),
        "no shape": (edit(lambda h: h["leaves"][0].pop("shape")), "invalid shape"),
        "negative shape": (edit(lambda h: h["leaves"][0].update(shape=[-4, 8])), "invalid shape"),
        "huge shape": (edit(lambda h: h["leaves"][0].update(shape=[2**30, 2**30])), "more than ziplm writes"),
        "string offset": (edit(lambda h: first_section(h).update(offset="0")), "malformed section"),
        "negative length": (edit(lambda h: first_section(h).update(length=-1)), "malformed section"),
        "overlapping": (edit(lambda h: first_section(h, 1).update(offset=0)), "not where the previous one ends"),
        "group 0": (edit(lambda h: h["leaves"][grid].update(group=0, layout="group")), "invalid layout"),
        "bogus layout": (edit(lambda h: h["leaves"][grid].update(layout="diagonal")), "has layout 'diagonal'"),
        "no scale shape": (edit(lambda h: h["leaves"][grid].pop("scale_shape")), "has scale_shape None"),
        "no scales": (
            edit(lambda h: _rename(h["leaves"][grid]["sections"], "scale", "scales")),
            r"lacks section\(s\) \['scale'\]",
        ),
        "unknown kind": (edit(lambda h: h["leaves"][0].update(kind="zip")), "unknown kind 'zip'"),
        "version x": (edit(lambda h: h.update(version="x")), "says version 'x'"),
        "string bound": (edit(lambda h: first_section(h).update(bound_bits="8")), "bound_bits '8'"),
        "a list": ([1, 2], "header format"),
        "unknown dtype": (edit(lambda h: h["leaves"][0].update(dtype="complex64")), "dtype"),
    }
    for h, match in cases.values():
        bad = tmp_path / "crafted.zlm"
        bad.write_bytes(container.with_header(data, h))
        with pytest.raises(errors.CorruptData, match=match):
            pack.unpack(bad)
    # A header that inflates far past any real one is refused before it is parsed.
    bomb = zlib.compress(b"{" + b" " * (80 << 20) + b"}", 9)
    bad.write_bytes(container.with_header(data, None, raw=bomb))
    with pytest.raises(errors.CorruptData, match="inflates past"):
        container.Reader(bad)


def test_write_is_atomic_and_refuses_to_overwrite(packed_file):
    path, effective = packed_file
    before = path.read_bytes()
    with pytest.raises(errors.UserError, match="exists"):
        pack.pack(effective, path, meta={})
    assert path.read_bytes() == before and not list(path.parent.glob(".m.zlm.*"))


# --- structure found without hints: dequantized GGUF / GPTQ blocks, palettes ---------------------------------------


def _gguf(kind, out, n_in, seed=0):
    """A (out, n_in) tensor quantized and dequantized by the `gguf` package, as llama.cpp lays it out."""
    gguf = pytest.importorskip("gguf")
    qt = getattr(gguf.GGMLQuantizationType, kind)
    w = np.random.default_rng(seed).normal(0, 0.05, (out, n_in)).astype(np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(w, qt), qt).astype(np.float32)


def _packed_leaf(x, tmp_path):
    out = tmp_path / "g.zlm"
    pack.pack({"l": {"kernel": x}}, out, meta={}, overwrite=True)
    _, back = pack.unpack(out)
    _same_bits({"l": {"kernel": x}}, back)
    leaf = container.Reader(out).leaves[0]
    return leaf, 8 * sum(s["length"] for s in leaf["sections"].values()) / x.size


@pytest.mark.parametrize("kind,limit", [("Q4_0", 6), ("Q4_1", 6), ("Q8_0", 10)])
def test_dequantized_gguf_blocks_pack_as_their_codes(kind, limit, tmp_path):
    x = np.ascontiguousarray(_gguf(kind, 256, 576).T)  # our (in, out) kernel: blocks of 32 along the input
    leaf, bits = _packed_leaf(x, tmp_path)
    assert leaf["kind"] == "affine" and leaf["block"] == 32 and leaf["axis"] == "in" and leaf["exceptions"] == 0
    assert leaf["scale_dtype"] == "float16" and bits < limit  # GGUF itself: 4.5, 5.0 and 8.5 bits per weight
    emb = _gguf(kind, 512, 64, seed=1)  # an embedding (vocab, d) is blocked along its last axis in both layouts
    leaf, bits = _packed_leaf(emb, tmp_path)
    assert leaf["kind"] == "affine" and leaf["axis"] == "last" and bits < limit


def test_embedding_columns_get_streams_of_their_own(tmp_path):
    """Q8_0 codes of an embedding whose columns differ in spread: one code stream per column is smaller."""
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    w = (rng.normal(0, 1, (8192, 64)) * np.tile([0.2, 0.01], 32)).astype(np.float32)  # wide and narrow columns
    qt = gguf.GGMLQuantizationType.Q8_0
    x = gguf.quants.dequantize(gguf.quants.quantize(w, qt), qt).astype(np.float32)
    leaf, _ = _packed_leaf(x, tmp_path)
    r = container.Reader(tmp_path / "g.zlm")
    assert leaf["kind"] == "affine" and len(pack.found.split_codes(r.section(leaf, "codes"))) == 64


def test_random_floats_are_not_mistaken_for_a_grid(tmp_path):
    x = np.random.default_rng(0).normal(0, 0.05, (576, 96)).astype(np.float32)
    assert pack.found.encode(x) is None
    leaf, _ = _packed_leaf(x, tmp_path)
    assert leaf["kind"] == "float"


def test_one_weight_off_by_an_ulp_still_round_trips(tmp_path):
    x = np.ascontiguousarray(_gguf("Q4_1", 128, 576).T)
    x[37, 5] = np.nextafter(x[37, 5], np.float32(1))
    leaf, bits = _packed_leaf(x, tmp_path)  # the bit-exact comparison is inside
    assert leaf["kind"] == "affine" and leaf["exceptions"] == 1 and bits < 6  # one block of 32 stored raw
    x[:, :] = np.nextafter(x, np.float32(1))[:, :]  # every block off the grid: floats again
    x[::7] = np.random.default_rng(1).normal(0, 0.05, x[::7].shape)
    leaf, _ = _packed_leaf(x, tmp_path)
    assert leaf["kind"] == "float"


def test_blocks_whose_codes_miss_both_ends(tmp_path):
    """Q4_1-like blocks (fp16 d and m, value = d*q + m in float32) whose codes use only 3..12 of 0..15."""
    rng = np.random.default_rng(0)
    n_blocks, b = 2048, 32
    d = rng.uniform(0.005, 0.2, (n_blocks, 1)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-3, 1, (n_blocks, 1)).astype(np.float16).astype(np.float32)
    q = rng.integers(3, 13, (n_blocks, b)).astype(np.float32)
    x = (d * q + m).astype(np.float32).reshape(-1, 64)  # blocks along the last axis
    leaf, bits = _packed_leaf(x, tmp_path)
    assert leaf["kind"] == "affine" and leaf["block"] == 32 and leaf["exceptions"] <= n_blocks // 100 and bits < 6


@given(st.integers(0, 2**32 - 1), st.sampled_from(["in", "last"]), st.sampled_from([16, 32, 64]))
@settings(max_examples=25, deadline=None)
def test_found_grids_round_trip_bit_exactly(seed, axis, b):
    """Random block grids (fp16 or fp32 scales and offsets, 1 to 8 bits, affine or symmetric, a few damaged
    weights) decode to their exact bits, and are found when they are the GGUF / GPTQ kinds (fp16 parameters)."""
    rng = np.random.default_rng(seed)
    n_blocks, f16 = 64, rng.random() < 0.5
    d = rng.uniform(1e-3, 1.0, (n_blocks, 1)).astype(np.float16 if f16 else np.float32).astype(np.float32)
    symmetric, bits = rng.random() < 0.5, 4
    if symmetric:
        rows = rng.integers(-8, 8, (n_blocks, b)).astype(np.float32) * (
            d * rng.choice(np.float32([-1, 1]), (n_blocks, 1))
        )
    else:
        m = rng.uniform(-2, 2, (n_blocks, 1)).astype(np.float16 if f16 else np.float32).astype(np.float32)
        bits = int(rng.integers(1, 9))
        rows = rng.integers(0, 1 << bits, (n_blocks, b)).astype(np.float32) * d + m
    bad = rng.integers(0, rows.size, int(rng.integers(0, 3)))
    rows.ravel()[bad] = np.nextafter(rows.ravel()[bad], np.float32(np.inf))
    x = rows.reshape(-1, 4 * b) if axis == "last" else rows.reshape(-1, 4, b).transpose(0, 2, 1).reshape(-1, 4)
    record, sections = pack.encode_leaf("x", x)
    back = pack.decode_leaf(record, sections)
    assert np.array_equal(back.view(np.uint32), x.view(np.uint32))
    # Found when they are the GGUF / GPTQ kinds: symmetric, or fp16 parameters with at most 4-bit codes (8-bit codes
    # in blocks of 16 rarely span their range or show the unit gap, so the scale may not be recovered: then float).
    if (symmetric or (f16 and bits <= 4)) and not len(bad):
        assert record["kind"] in ("affine", "palette")


def test_per_channel_palette_without_a_hint(tmp_path):
    rng = np.random.default_rng(0)
    book = rng.normal(0, 0.05, (64, 6)).astype(np.float32)  # 6 arbitrary values per output channel
    x = np.take_along_axis(book, rng.integers(0, 6, (64, 512)), 1).T.copy()  # (in 512, out 64)
    leaf, bits = _packed_leaf(x, tmp_path)
    assert leaf["kind"] == "palette" and leaf["layout"] == "channel" and bits < 4


def test_finding_grids_is_fast():
    import time

    x = np.ascontiguousarray(_gguf("Q4_1", 1536, 576).T)  # (576, 1536), an MLP kernel of SmolLM2
    t = time.perf_counter()
    record, _ = pack.encode_leaf("x", x)
    assert record["kind"] == "affine" and time.perf_counter() - t < 3.0


def test_a_damaged_affine_record_is_refused():
    x = np.ascontiguousarray(_gguf("Q8_0", 64, 64).T)
    record, sections = pack.encode_leaf("x", x)
    assert record["kind"] == "affine"
    with pytest.raises(errors.CorruptData, match="missing"):
        pack.decode_leaf(dict(record, exceptions=1), sections)
    with pytest.raises(errors.CorruptData, match="20 codes in 1 streams"):
        pack.decode_leaf(record, dict(sections, codes=pack.found._code_section(np.zeros((2, 10), np.uint8))))
    with pytest.raises(errors.CorruptData, match="streams do not add up"):
        pack.decode_leaf(record, dict(sections, codes=sections["codes"][:-1]))
    with pytest.raises(errors.CorruptData, match="does not tile"):
        pack.decode_leaf(dict(record, block=48), sections)


@pytest.mark.parametrize("form", ["levels", "codes"])
def test_integer_grids_store_levels_or_codes_whichever_is_smaller(form, tmp_path):
    rng = np.random.default_rng(0)
    lay = codes.Layout("group", 64)
    if form == "levels":  # one zero point: the levels code the same, and need no zero points
        c, z = rng.integers(0, 16, (256, 8)), np.full((4, 8), 8)
    else:  # every code 7, zero points all over: the codes are one symbol, their levels are not
        c, z = np.full((256, 8), 7), rng.integers(0, 16, (4, 8))
    code = codes.Grid(c.astype(np.uint8), rng.uniform(0.01, 0.1, (4, 8)).astype(np.float32), z.astype(np.uint8), lay)
    x = codes.decode(code)
    pack.pack({"k": x}, tmp_path / "g.zlm", meta={}, exported={"k": code})
    (leaf,) = container.Reader(tmp_path / "g.zlm").leaves
    assert leaf["kind"] == "grid" and bool(leaf.get("centered")) == (form == "levels")
    assert ("zero" in leaf["sections"]) == (form == "codes")
    _same_bits({"k": x}, pack.unpack(tmp_path / "g.zlm")[1])


def test_grid_parameters_that_are_float16_values_are_stored_in_two_bytes(tmp_path):
    rng = np.random.default_rng(1)
    lay = codes.Layout("group", 32)
    scale = rng.uniform(0.01, 0.1, (4, 64)).astype(np.float16).astype(np.float32)  # GGUF Q4_1: fp16 d and m
    minimum = rng.normal(0, 0.1, (4, 64)).astype(np.float16).astype(np.float32)
    code = codes.Grid(rng.integers(0, 16, (128, 64)).astype(np.uint8), scale, minimum, lay, float_zero=True)
    x = codes.decode(code)
    sizes = {}
    for name, c in (("half", code), ("full", dataclasses.replace(code, scale=scale * np.float32(1 + 2**-20)))):
        xc = codes.decode(c)
        pack.pack({"k": xc}, tmp_path / f"{name}.zlm", meta={}, exported={"k": c})
        (leaf,) = container.Reader(tmp_path / f"{name}.zlm").leaves
        sizes[name] = sum(s["length"] for n, s in leaf["sections"].items() if n in ("scale", "offset"))
        assert leaf.get("param_dtype", "float32") == ("float16" if name == "half" else "float32")
        _same_bits({"k": xc}, pack.unpack(tmp_path / f"{name}.zlm")[1])
    assert sizes["half"] < sizes["full"] and x.dtype == np.float32


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize(
    "specs",
    [
        [dict(method="codebook", bits=3, granularity="channel")],
        [dict(method="rtn", bits=3, granularity="group", group_size=16, symmetric=False)],
        [dict(method="magnitude", sparsity=0.5), dict(method="rtn", bits=4)],
        [dict(method="rtn", bits=4, granularity="group", group_size=32, zero="float", param_dtype="float16")],
    ],
    ids=["codebook", "rtn-group", "magnitude+rtn", "q4_1"],
)
def test_a_packed_file_gives_back_its_codes_and_packs_again_as_it_was(specs, tmp_path):
    _, _, params = _tiny()
    t = pipeline.build(specs)
    state = t.init(params, jax.random.key(0), None)
    effective = jax.tree.map(np.asarray, t.apply(params, state))
    pack.pack(effective, tmp_path / "a.zlm", meta={}, exported=core.export(t, params, state))
    back = pack.codes_of(tmp_path / "a.zlm")
    assert back and all(isinstance(c, codes.Grid | codes.Palette) for c in back.values())
    pack.pack(pack.unpack(tmp_path / "a.zlm")[1], tmp_path / "b.zlm", meta={}, exported=back)
    a, b = (container.Reader(tmp_path / f).leaves for f in ("a.zlm", "b.zlm"))
    for x, y in zip(a, b):
        assert (x["kind"], x["sections"].keys()) == (y["kind"], y["sections"].keys()), x["path"]
        assert [s["length"] for s in x["sections"].values()] == [s["length"] for s in y["sections"].values()]


@pytest.mark.filterwarnings("error")
def test_a_small_grid_with_negative_levels_packs_as_its_levels(tmp_path):
    # Found by hypothesis: a stream this short is stored raw, and raw symbols come back unsigned (level - 255 wrapped).
    c = codes.Grid(np.array([[14], [8], [9], [15]], np.uint8), np.float32(0.0815), np.uint8(10), codes.Layout("tensor"))
    x = codes.decode(c)
    pack.pack({"k": x}, tmp_path / "s.zlm", meta={}, exported={"k": c})  # the code gives its values: no warning
    _same_bits({"k": x}, pack.unpack(tmp_path / "s.zlm")[1])
    record, sections = pack._enc_grid(x, c)  # the levels form (4 floats are smaller still, so it is not stored)
    assert record["centered"]
    back = pack.decode_leaf(dict(record, path="k", shape=[4, 1], dtype="float32", kind="grid"), sections)
    _same_bits({"k": x}, {"k": back})
