"""Channel and group layouts on rectangular, prime-sized kernels: a transposition of in and out (invisible on the
square kernels most tests use) would put a column's scale, group or codebook row on another column's weights."""

import jax
import numpy as np
import pytest

from research import codes
from research.compress import core, registry
from research.compress.quant import grid as grid_lib

IN, OUT = 13, 7  # primes: no reshape of one into the other lines up by accident


def _kernel(seed=0, shape=(IN, OUT)):
    rng = np.random.default_rng(seed)
    # Every column on its own scale, so a wrong column's statistics give a visibly wrong grid.
    return (rng.normal(size=shape) * np.geomspace(0.01, 10, shape[-1])).astype(np.float32)


def test_channel_scales_are_per_output_column():
    w = _kernel()
    g = grid_lib.Grid(4, True, "channel")
    scale, _ = grid_lib.fit(w, g)
    assert scale.shape == (OUT,)
    np.testing.assert_allclose(scale, np.abs(w).max(axis=0) / 7, rtol=1e-6)


@pytest.mark.parametrize("group", [5, 13])
def test_group_scales_cover_consecutive_inputs_of_one_column(group):
    w = _kernel(1)
    g = grid_lib.Grid(4, False, "group", group)
    scale, zero = grid_lib.fit(w, g)
    n = -(-IN // group)
    assert scale.shape == (n, OUT)
    for j in range(n):  # the last group is shorter when group does not divide IN
        block = w[j * group : (j + 1) * group]
        lo, hi = np.minimum(block.min(0), 0), np.maximum(block.max(0), 0)
        np.testing.assert_allclose(scale[j], (hi - lo) / 15, rtol=1e-6)
    back = grid_lib.dequantize(grid_lib.quantize(w, scale, zero, g), scale, zero, g)
    err = np.abs(np.asarray(back) - w)
    step = np.asarray(g.layout.expand(scale, w.shape))
    assert (err <= step / 2 + 1e-6).all()  # each weight within half a step of its own group's grid


@pytest.mark.parametrize("granularity, group", [("channel", 1), ("group", IN)])
def test_codebook_problems_are_columns(granularity, group):
    w = _kernel(2, (IN, 2 * OUT))
    lay = codes.Layout.of(granularity, group)
    rows = np.asarray(lay.to_problems(w))
    assert rows.shape == (2 * OUT, IN)
    np.testing.assert_array_equal(rows[3], w[:, 3])
    np.testing.assert_array_equal(np.asarray(lay.from_problems(rows, w.shape)), w)


@pytest.mark.parametrize(
    "spec",
    [
        dict(method="rtn", bits=3, granularity="channel"),
        dict(method="rtn", bits=4, granularity="group", group_size=5),
        dict(method="codebook", bits=2, granularity="channel"),
    ],
    ids=["rtn-channel", "rtn-group", "codebook-channel"],
)
def test_transforms_keep_each_columns_values_on_its_own_grid(spec):
    w = _kernel(3)
    params = {"layers": {0: {"mlp": {"up": {"kernel": w}}}}}
    t = registry.make(spec.pop("method"), **spec)
    state = t.init(params, jax.random.key(0), None)
    out = np.asarray(core.touched(t.apply(params, state))["layers/0/mlp/up/kernel"])
    assert out.shape == w.shape and not np.array_equal(out, w)
    for c in range(OUT):  # a column's values are few and within its own range
        assert len(np.unique(out[:, c])) <= 2 ** spec["bits"]
        assert np.abs(out[:, c]).max() <= np.abs(w[:, c]).max() * 1.5 + 1e-6


@pytest.mark.filterwarnings("error")  # an export the packer cannot reproduce warns
@pytest.mark.parametrize(
    "spec, kind",
    [
        (dict(method="rtn", bits=4, granularity="group", group_size=5), "grid"),  # a shorter last group
        (dict(method="rtn", bits=4, granularity="group", group_size=5, zero="float"), "grid"),
        (dict(method="qat", bits=3, granularity="channel"), "grid"),
        (dict(method="codebook", bits=2, granularity="channel"), "palette"),
    ],
    ids=["rtn-group", "rtn-float-minimum", "qat-channel", "codebook-channel"],
)
def test_exported_codes_pack_in_the_transforms_own_layout(spec, kind, tmp_path):
    from research.coding import container, pack

    params = {"layers": {0: {"mlp": {"up": {"kernel": _kernel(4)}}}}}
    t = registry.make(spec.pop("method"), **spec)
    state = t.init(params, jax.random.key(0), None)
    exported = codes.to_numpy(core.export(t, params, state))
    effective = jax.tree.map(np.asarray, t.apply(params, state))
    path = "layers/0/mlp/up/kernel"
    assert codes.describes(exported[path], core.touched(effective)[path])
    pack.pack(effective, tmp_path / "m.zlm", meta={}, exported=exported)
    leaf = container.Reader(tmp_path / "m.zlm").leaves[0]
    assert leaf["kind"] == kind and leaf["shape"] == [IN, OUT]
    _, back = pack.unpack(tmp_path / "m.zlm")
    np.testing.assert_array_equal(
        back["layers"][0]["mlp"]["up"]["kernel"].view(np.uint32), core.touched(effective)[path].view(np.uint32)
    )
