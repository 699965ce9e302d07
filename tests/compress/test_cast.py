"""cast: norms, biases and position tables rounded to a smaller float type, packed in about its bits, chosen per
leaf by measured loss through mixed."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from research import errors, models
from research.coding import pack
from research.compress import calib, core, mixed, registry
from research.compress.quant import cast
from research.models import config as model_config


@pytest.mark.parametrize("dtype", cast.DTYPES)
def test_cast_rounds_to_the_type_and_passes_gradients_straight_through(dtype):
    rng = np.random.default_rng(0)
    params = {"norm": {"scale": (1 + 0.1 * rng.normal(size=4096)).astype(np.float32)}, "w": np.ones(3, np.float32)}
    params["norm"]["scale"][:2] = [1e6, -1e6]  # beyond float8_e4m3fn / float16 range: saturate
    t = cast.cast(dtype, where="norm/scale")
    state = t.init(params, jax.random.key(0), None)
    out = np.asarray(t.apply(params, state)["norm"]["scale"])
    target = getattr(ml_dtypes, dtype) if dtype.startswith("float8") else np.dtype(dtype)
    top = float(ml_dtypes.finfo(target).max)
    expect = np.clip(params["norm"]["scale"], -top, top).astype(target).astype(np.float32)
    np.testing.assert_array_equal(out, expect)
    assert np.asarray(t.apply(params, state)["w"]).tolist() == [1.0, 1.0, 1.0]  # unselected: untouched
    grad = jax.grad(lambda p: jnp.sum(t.apply(p, state)["norm"]["scale"] * 3.0))(params)
    np.testing.assert_array_equal(np.asarray(grad["norm"]["scale"]), 3.0)
    record, sections = pack.encode_leaf("norm/scale", out)
    bits = 8 * sum(map(len, sections.values())) / out.size
    width = 16 if dtype in ("float16", "bfloat16") else 8
    assert bits < width + 1, bits  # about the type's own bits (entropy-coded planes), far below 32


def test_bad_dtype_and_default_selection():
    with pytest.raises(errors.UserError, match="cast dtype"):
        cast.cast("float64")
    cfg = model_config.gpt2_style(vocab_size=64, n_layer=1, n_head=2, d_model=32, max_seq_len=16, bias=True)
    _, params = models.init(cfg)
    chosen = core.select(params, cast.SMALL_LEAVES)
    assert chosen and all(p.endswith(("/scale", "/bias")) for p in chosen)
    assert not any(p.endswith(("kernel", "embedding")) for p in chosen)


def test_mixed_picks_the_smallest_type_within_a_loss_budget():
    cfg = model_config.gpt2_style(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=16)
    graphdef, params = models.init(cfg)
    rng = np.random.default_rng(1)  # norms start at exactly 1 and 0: give every leaf values of its own
    params = jax.tree.map(lambda x: x + 0.3 * rng.normal(size=x.shape).astype(np.float32), params)
    tokens = (np.arange(6000) * 7 % 61).astype(np.int32)
    data = calib.Calibration(graphdef, calib.sample(tokens, 16, 16, seed=0), batch_size=8)
    options = [dict(method="cast", dtype=d) for d in ("float8_e4m3fn", "bfloat16", "float16")]
    spec = dict(method="mixed", options=options, where=cast.SMALL_LEAVES + "|pos_embed/embedding")
    loose = registry.make(**spec, max_loss_increase=1.0).init(params, jax.random.key(0), data)
    rep = mixed.report({**spec, "max_loss_increase": 1.0}, params, loose)
    assert all(r["bytes"] == min(r["options_bytes"]) for r in rep["leaves"])  # everything fits: the smallest
    sizes = np.asarray(loose["bytes"])
    pos = next(r for r in rep["leaves"] if r["leaf"] == "pos_embed/embedding")  # 512 values: float8 is smaller
    assert pos["options_bytes"][0] < pos["options_bytes"][1] < pos["options_bytes"][2] and pos["option"] == 0
    sens = np.asarray(loose["sensitivity"], np.float64)
    limit = float(sens[:, 1].sum())  # every leaf at bfloat16 fits exactly
    spec = {**spec, "max_loss_increase": limit}
    rep = mixed.report(spec, params, registry.make(**spec).init(params, jax.random.key(0), data))
    assert rep["predicted_loss_increase"] <= limit + 1e-9
    assert rep["allocated_bytes"] <= sizes[:, 1].sum()  # no larger than all-bfloat16, which fits
    assert {r["leaf"] for r in rep["leaves"]} == set(core.select(params, spec["where"]))
