"""Grid conventions: the float-minimum grid (GGUF Q4_1's parametrisation) requantizes Q4_1 weights exactly, the
reference symmetric scale, GPTQ's group-fit timings, and every convention named in reports."""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import errors
from research.compress.quant import gptq, rtn
from research.compress.quant import grid as qgrid

RNG = np.random.default_rng(0)


def _q4_1(out=48, din=128):
    """An (in, out) kernel whose every 32-block of inputs lies on a Q4_1 grid (written by the gguf package)."""
    w = (RNG.normal(size=(out, din)) * 0.05).astype(np.float32)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_1)
    return np.asarray(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_1), np.float32).T  # (in, out)


Q4_1 = qgrid.Grid(4, False, "group", 32, zero="float", param_dtype="float16")


def test_float_minimum_grid_requantizes_q4_1_exactly():
    w = _q4_1()
    s, z = qgrid.fit(w, Q4_1)
    back = np.asarray(qgrid.dequantize(qgrid.quantize(w, s, z, Q4_1), s, z, Q4_1))
    assert np.array_equal(back, w)  # bit for bit
    assert np.array_equal(np.asarray(s), np.asarray(s).astype(np.float16).astype(np.float32))
    integer = qgrid.Grid(4, False, "group", 32)  # ziplm's integer zero point cannot place the float minimum
    s2, z2 = qgrid.fit(w, integer)
    err = np.asarray(qgrid.dequantize(qgrid.quantize(w, s2, z2, integer), s2, z2, integer)) - w
    assert np.sum(err**2) / np.sum(w**2) > 1e-4


def test_gptq_on_an_exact_grid_changes_nothing():
    w = _q4_1()
    x = RNG.normal(size=(2048, w.shape[0])).astype(np.float32)
    codes, s, z = gptq.quantize_layer(w, x.T @ x, Q4_1, blocksize=64)
    assert z.dtype == jnp.float32
    assert np.array_equal(np.asarray(qgrid.dequantize(codes, s, z, Q4_1)), w)


def test_float_minimum_state_and_transform():
    params = {"layers": {"0": {"mlp": {"up": {"kernel": jnp.asarray(_q4_1())}}}}}
    t = rtn.rtn(4, granularity="group", group_size=32, zero="float", param_dtype="float16")
    state = t.init(params, jax.random.PRNGKey(0), None)
    leaf = state["zero"]["layers"]["0"]["mlp"]["up"]["kernel"]
    assert leaf.dtype == jnp.float32 and leaf.shape == (4, 48)
    out = t.apply(params, state)["layers"]["0"]["mlp"]["up"]["kernel"]
    assert np.array_equal(np.asarray(out), np.asarray(params["layers"]["0"]["mlp"]["up"]["kernel"]))


def test_reference_symmetric_scale_uses_every_code():
    w = jnp.asarray(RNG.normal(size=(64, 8)).astype(np.float32))
    ref = qgrid.Grid(4, True, "channel", sym_scale="reference")
    full = qgrid.Grid(4, True, "channel")
    s_ref, _ = qgrid.fit(w, ref)
    s_full, _ = qgrid.fit(w, full)
    absmax = np.abs(np.asarray(w)).max(0)
    np.testing.assert_allclose(np.asarray(s_ref), absmax / 7.5, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(s_full), absmax / 7, rtol=1e-6)
    codes = np.asarray(qgrid.quantize(w, s_ref, 8.0, ref))
    assert codes.min() == 0 or codes.max() == 15  # the extreme weight reaches an end code


def test_static_group_fit_equals_rtn_scales():
    w = (RNG.normal(size=(64, 16)) * 0.1).astype(np.float32)
    x = RNG.normal(size=(1024, 64)).astype(np.float32)
    grid = qgrid.Grid(4, False, "group", 16)
    _, s, z = gptq.quantize_layer(w, x.T @ x, grid, blocksize=32, group_fit="static")
    s_rtn, z_rtn = qgrid.fit(w, grid)
    assert np.array_equal(np.asarray(s), np.asarray(s_rtn)) and np.array_equal(np.asarray(z), np.asarray(z_rtn))


def test_bad_conventions_are_errors():
    with pytest.raises(errors.UserError, match="asymmetric"):
        qgrid.Grid(4, True, zero="float")
    with pytest.raises(errors.UserError, match="sym_scale"):
        qgrid.Grid(4, True, sym_scale="half")
    with pytest.raises(errors.UserError, match="param_dtype"):
        qgrid.Grid(4, param_dtype="int8")
    with pytest.raises(errors.UserError, match="group_fit"):
        gptq.gptq(4, group_fit="late")


def test_describe_names_the_convention():
    assert "float minimum" in Q4_1.describe() and "groups of 32" in Q4_1.describe() and "fp16" in Q4_1.describe()
    assert "reference" in qgrid.Grid(4, True, sym_scale="reference").describe()
    assert "integer zero point" in qgrid.Grid(4, False).describe()


@pytest.mark.parametrize("zero", ["integer", "float"])
def test_a_shorter_last_group_is_fitted_on_its_own_inputs(zero):
    w = jnp.asarray(RNG.normal(size=(40, 6)).astype(np.float32))
    w = w.at[32:].multiply(10.0)  # the last, shorter group (8 inputs) has a much wider range
    grid = qgrid.Grid(4, False, "group", 16, zero=zero)
    s, z = qgrid.fit(w, grid)
    assert s.shape == (3, 6)
    s_last, z_last = qgrid.fit(w[32:], qgrid.Grid(4, False, "channel", zero=zero))
    np.testing.assert_array_equal(np.asarray(s[2]), np.asarray(s_last))
    np.testing.assert_array_equal(np.asarray(z[2]), np.asarray(z_last))
    back = qgrid.dequantize(qgrid.quantize(w, s, z, grid), s, z, grid)
    assert back.shape == w.shape
    assert np.all(np.abs(np.asarray(back - w)) <= np.asarray(grid.layout.expand(s, w.shape)) / 2 + 1e-6)


def test_signed_scale_is_llama_cpps_q4_0_fit():
    w = (RNG.normal(size=(128, 48)) * 0.05).astype(np.float32)  # (in, out)
    g = qgrid.Grid(4, True, "group", 32, sym_scale="signed", param_dtype="float16")
    s, z = qgrid.fit(w, g)
    codes = np.asarray(qgrid.quantize(w, s, z, g))
    ours = np.asarray(qgrid.dequantize(codes, s, z, g))
    ref = gguf.quants.quantize(np.ascontiguousarray(w.T), gguf.GGMLQuantizationType.Q4_0)
    theirs = np.asarray(gguf.quants.dequantize(ref, gguf.GGMLQuantizationType.Q4_0)).reshape(48, 128).T
    # llama.cpp rounds with the float32 scale and stores it in fp16; ziplm rounds with the stored scale: the same
    # values but for weights within float error of a rounding boundary
    assert np.mean(ours == theirs) > 0.999
    blocks = np.abs(w).reshape(4, 32, 48).argmax(1)  # the largest |w| of each block gets code 0
    assert (np.take_along_axis(codes.reshape(4, 32, 48), blocks[:, None], 1) == 0).all()
    assert (np.asarray(s) < 0).any() and (np.asarray(s) > 0).any()  # negative where that weight is positive
    assert "signed max/-2^(b-1)" in g.describe()


def test_gguf_presets_fix_the_grid_and_refuse_contradictions():
    t = rtn.rtn(gguf="q4_0")
    params = {"layers": {"0": {"mlp": {"up": {"kernel": jnp.asarray(RNG.normal(size=(64, 8)), jnp.float32)}}}}}
    state = t.init(params, jax.random.PRNGKey(0), None)
    scale = state["scale"]["layers"]["0"]["mlp"]["up"]["kernel"]
    assert scale.shape == (2, 8) and np.array_equal(np.asarray(scale, np.float16).astype(np.float32), scale)
    assert qgrid.for_gguf("q4_0", qgrid.Grid(), qgrid.Grid()).sym_scale == "signed"
    kept = qgrid.for_gguf("q4_0", qgrid.Grid(sym_scale="reference"), qgrid.Grid())  # a fit asked for is kept
    assert (kept.sym_scale, kept.group_size, kept.param_dtype) == ("reference", 32, "float16")
    assert qgrid.for_gguf("q8_0", qgrid.Grid(), qgrid.Grid()).bits == 8
    with pytest.raises(errors.UserError, match="gguf='q4_0' fixes bits=4; drop bits=3"):
        gptq.gptq(3, gguf="q4_0")
    with pytest.raises(errors.UserError, match="gguf='q8_0' fixes group_size=32; drop group_size=128"):
        rtn.rtn(granularity="group", group_size=128, gguf="q8_0")  # 128 is the default, but groups were asked for
