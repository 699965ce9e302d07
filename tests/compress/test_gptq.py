"""GPTQ: equals an unblocked reference sweep, beats RTN on correlated inputs, keeps pruned zeros, real codes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import errors, models
from research.compress import calib, core
from research.compress.prune import magnitude
from research.compress.quant import gptq
from research.compress.quant import grid as qgrid
from research.models import config as model_config

RNG = np.random.default_rng(0)
DIN, DOUT = 64, 32
X = RNG.normal(size=(4096, DIN)) @ (RNG.normal(size=(DIN, DIN)) * 0.3 + np.eye(DIN))
X[:, :8] += 5 * RNG.normal(size=(4096, 1))  # strongly correlated inputs
W = (RNG.normal(size=(DIN, DOUT)) * 0.1).astype(np.float32)
H = (X.T @ X).astype(np.float32)


def _reference(w, h, grid, percdamp=0.01, fit_block=None):
    """The GPTQ recursion one column at a time in float64 (no lazy blocks), channel or dynamic group scales;
    with `fit_block`, group scales come from the weights as they stood at the start of each such block."""
    w = w.T.astype(np.float64).copy()  # (out, in)
    h = h.astype(np.float64) + percdamp * np.mean(np.diag(h)) * np.eye(len(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    channel = qgrid.Grid(grid.bits, grid.symmetric, "channel")
    s, z = (np.asarray(a, np.float64) for a in qgrid.fit(w.T, channel))
    codes = np.zeros_like(w)
    start = w
    for i in range(w.shape[1]):
        if fit_block and i % fit_block == 0:
            start = w.copy()
        src = start if fit_block else w
        if grid.granularity == "group" and i % grid.group_size == 0:
            s, z = (np.asarray(a, np.float64) for a in qgrid.fit(src[:, i : i + grid.group_size].T, channel))
        codes[:, i] = np.clip(np.round(w[:, i] / s + z), 0, grid.maxq)
        q = (codes[:, i] - z) * s
        w[:, i:] -= ((w[:, i] - q) / u[i, i])[:, None] * u[i, i:][None, :]
    return codes.T


def _error(q):
    return float(np.linalg.norm(X @ W - X @ np.asarray(q, np.float64)))


@pytest.mark.parametrize(
    "granularity, group_size, group_fit",
    [("channel", 128, "block"), ("group", 16, "sweep"), ("group", 16, "block"), ("group", 24, "block")],
)
@pytest.mark.parametrize("symmetric", [True, False])
def test_blocked_sweep_equals_the_unblocked_reference(granularity, group_size, group_fit, symmetric):
    grid = qgrid.Grid(4, symmetric, granularity, group_size)
    codes, scale, zero = gptq.quantize_layer(W, H, grid, blocksize=32, group_fit=group_fit)
    bs = max(group_size, 32 // group_size * group_size)  # the lazy block: a multiple of the group size
    ref = _reference(W, H, grid, fit_block=bs if group_fit == "block" else None)
    assert np.mean(np.asarray(codes) == ref) > 0.99  # float32 blocked vs float64: rare ties may round apart
    got = _error(qgrid.dequantize(codes, scale, zero, grid))
    want = _error(qgrid.dequantize(jnp.asarray(ref, jnp.uint8), scale, zero, grid))
    assert got == pytest.approx(want, rel=0.01)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize(
    "granularity, act_order", [("channel", False), ("channel", True), ("group", False), ("group", True)]
)
def test_gptq_output_error_is_below_rtn(bits, granularity, act_order):
    grid = qgrid.Grid(bits, True, granularity, 16)
    s, z = qgrid.fit(W, grid)
    rtn = _error(qgrid.dequantize(qgrid.quantize(W, s, z, grid), s, z, grid))
    codes, scale, zero = gptq.quantize_layer(W, H, grid, blocksize=32, act_order=act_order)
    assert codes.dtype == jnp.uint8 and int(codes.max()) <= grid.maxq
    assert _error(qgrid.dequantize(codes, scale, zero, grid)) < 0.8 * rtn


def _tiny():
    cfg = model_config.gpt2_style(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=16)
    graphdef, params = models.init(cfg)
    data = calib.Calibration(graphdef, calib.sample(np.arange(4000) % 64, 16, 16, seed=0), batch_size=8)
    return params, data


@pytest.mark.parametrize("symmetric", [True, False])
def test_chain_with_pruning_keeps_zeros_and_stores_real_codes(symmetric):
    params, data = _tiny()
    t = core.chain(magnitude.magnitude(0.5), gptq.gptq(4, symmetric=symmetric, granularity="group", group_size=16))
    state = t.init(params, jax.random.key(0), data)
    effective = t.apply(params, state)
    m, q = state
    for path, mask in core.touched(m["masks"]).items():
        w = np.asarray(core.touched(effective)[path])
        assert (w[~np.asarray(mask)] == 0).all(), path
        codes = core.touched(q["codes"])[path]
        assert codes.dtype == jnp.uint8 and codes.shape == w.shape
        assert core.touched(q["scale"])[path].shape == (w.shape[0] // 16, w.shape[1])
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(effective))


def test_bad_input():
    params, data = _tiny()
    with pytest.raises(errors.UserError, match="gptq needs calibration data"):
        gptq.gptq(4).init(params, jax.random.key(0), None)
    with pytest.raises(errors.UserError, match="group size 40 exceeds the input dimension 32"):
        gptq.gptq(4, granularity="group", group_size=40).init(params, jax.random.key(0), data)
    for bad in (dict(bits=9), dict(blocksize=0), dict(percdamp=-1.0)):
        with pytest.raises(errors.UserError):
            gptq.gptq(**bad)
    with pytest.raises(errors.UserError, match="NaN/inf"):
        gptq.quantize_layer(W, H * np.nan, qgrid.Grid(4))
