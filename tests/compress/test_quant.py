"""Quantization: grids (codes, scales, exact zeros), fake quantization's clipped STE, RTN and QAT transforms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from research import errors, models
from research.compress import core
from research.compress.prune import magnitude
from research.compress.quant import fake, qat, rtn
from research.compress.quant import grid as qgrid
from research.models import config as model_config
from research.train import step as train_step

GRIDS = [
    qgrid.Grid(4, True, "tensor"),
    qgrid.Grid(4, False, "tensor"),
    qgrid.Grid(3, True, "channel"),
    qgrid.Grid(8, False, "channel"),
    qgrid.Grid(2, True, "group", 32),
    qgrid.Grid(4, False, "group", 32),
]


def weights(shape=(64, 8), seed=0):
    return jax.random.normal(jax.random.key(seed), shape) * jnp.linspace(0.1, 2.0, shape[-1])


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_codes_lie_on_the_grid_and_round_trip_within_half_a_step(grid):
    w = weights()
    scale, zero = qgrid.fit(w, grid)
    codes = qgrid.quantize(w, scale, zero, grid)
    assert codes.dtype == jnp.uint8 and codes.shape == w.shape
    assert int(codes.min()) >= 0 and int(codes.max()) <= 2**grid.bits - 1
    np.testing.assert_array_equal(zero, np.round(zero))  # integer zero points
    deq = np.asarray(qgrid.dequantize(codes, scale, zero, grid))
    s = np.asarray(grid.layout.expand(scale, w.shape)) * np.ones(w.shape, np.float32)
    z = np.asarray(grid.layout.expand(zero, w.shape)) * np.ones(w.shape, np.float32)
    np.testing.assert_array_equal(deq, (codes.astype(np.float32) - z) * s)
    assert np.all(np.abs(deq - np.asarray(w)) <= s / 2 * (1 + 1e-5))


def test_symmetric_convention_hand_checked():
    w = jnp.asarray([[-1.0, 0.5], [0.0, -0.25], [0.7, 1.0]])  # (in 3, out 2)
    grid = qgrid.Grid(3, True, "channel")
    scale, zero = qgrid.fit(w, grid)
    np.testing.assert_allclose(scale, [1.0 / 3, 1.0 / 3], rtol=1e-6)
    np.testing.assert_array_equal(zero, [4, 4])
    codes = qgrid.quantize(w, scale, zero, grid)
    np.testing.assert_array_equal(codes, [[1, 6], [4, 3], [6, 7]])


def test_scale_shapes_per_granularity():
    w = weights((64, 8))
    assert qgrid.fit(w, qgrid.Grid(4, True, "tensor"))[0].shape == ()
    scale, zero = qgrid.fit(w, qgrid.Grid(4, True, "channel"))
    assert scale.shape == zero.shape == (8,)
    assert len(np.unique(np.asarray(scale))) == 8  # per-column scales differ
    scale, zero = qgrid.fit(w, qgrid.Grid(4, False, "group", 32))
    assert scale.shape == zero.shape == (2, 8)
    np.testing.assert_allclose(scale[1, 3], (max(w[32:, 3].max(), 0) - min(w[32:, 3].min(), 0)) / 15, rtol=1e-6)


def test_fake_quant_forward_and_clipped_gradient():
    grid = qgrid.Grid(2, True, "tensor")  # zero 2: values (code - 2) * scale in [-2, 1] * scale
    w = jnp.asarray([[-3.0, -1.9, 0.3], [0.9, 1.4, 5.0]])
    scale, zero = jnp.float32(1.0), jnp.float32(2.0)
    np.testing.assert_array_equal(fake.fake_quant(w, scale, zero, grid), [[-2, -2, 0], [1, 1, 1]])
    gw = jax.grad(lambda w: fake.fake_quant(w, scale, zero, grid).sum())(w)
    np.testing.assert_array_equal(gw, [[0, 1, 1], [1, 0, 0]])  # 1 inside [-2, 1] * scale, else 0
    # LSQ step-size gradient: below -> -zero, above -> maxq - zero, inside -> round(w/s) - w/s.
    gs = jax.grad(lambda s: fake.fake_quant(w, s, zero, grid).sum())(scale)
    expected = -2 + (-2 + 1.9) + (0 - 0.3) + (1 - 0.9) + 1 + 1
    np.testing.assert_allclose(gs, expected, rtol=1e-5)


def test_fake_quant_gradient_per_channel_matches_range():
    w = weights((32, 4))
    grid = qgrid.Grid(4, False, "channel")
    scale, zero = qgrid.fit(w, grid)
    scale = scale * 0.5  # half the range: some weights now clip
    g = np.asarray(jax.grad(lambda w: fake.fake_quant(w, scale, zero, grid).sum())(w))
    lo, hi = np.asarray(-zero * scale), np.asarray((15 - zero) * scale)
    w = np.asarray(w)
    inside = (w >= lo) & (w <= hi)  # the representable range, no half-step margin
    np.testing.assert_array_equal(g, inside.astype(np.float32))
    assert 0 < g.mean() < 1


def tiny():
    cfg = model_config.gpt2_style(vocab_size=64, n_layer=1, n_head=2, d_model=32, max_seq_len=16)
    return models.init(cfg)


@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_state_holds_uint8_codes_and_apply_dequantizes(symmetric):
    _, params = tiny()
    t = rtn.rtn(4, symmetric=symmetric, granularity="group", group_size=16)
    state = t.init(params, jax.random.key(0), None)
    codes = core.touched(state["codes"])
    assert set(codes) == set(core.select(params, core.BLOCK_KERNELS))
    assert set(core.touched(state["scale"])) == set(codes) == set(core.touched(state["zero"]))
    assert all(c.dtype == jnp.uint8 for c in codes.values())
    assert core.touched(state["scale"])["layers/0/mlp/down/kernel"].shape == (128 // 16, 32)
    eff = t.apply(params, state)
    grid = qgrid.Grid(4, symmetric, "group", 16)
    for p, c in codes.items():
        s, z = core.touched(state["scale"])[p], core.touched(state["zero"])[p]
        np.testing.assert_array_equal(core.touched(eff)[p], qgrid.dequantize(c, s, z, grid))
    np.testing.assert_array_equal(eff["embed"]["embedding"], params["embed"]["embedding"])


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_pruned_zeros_stay_exactly_zero_through_rtn(symmetric, granularity):
    _, params = tiny()
    t = core.chain(magnitude.magnitude(0.5), rtn.rtn(3, symmetric=symmetric, granularity=granularity, group_size=16))
    state = t.init(params, jax.random.key(0), None)
    eff = core.touched(t.apply(params, state))
    for p, m in core.touched(t.masks(state)).items():
        m = np.asarray(m)
        assert (~m).sum() > 0
        assert np.all(np.asarray(eff[p])[~m] == 0.0)


def test_qat_trains_and_keeps_effective_weights_on_the_grid():
    graphdef, params = tiny()
    t = qat.qat(4)
    tx = optax.adam(1e-2)
    state = {**train_step.init_state(params, tx), "compress": t.init(params, jax.random.key(0), None)}
    step = train_step.make_train_step(graphdef, tx, seed=0, dropout=False, transform=t)
    tokens = jax.random.randint(jax.random.key(1), (4, 17), 0, 64)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    cstate = state["compress"]
    eff = core.touched(t.apply(state["params"], cstate))
    grid = qgrid.Grid(4, True, "channel")
    for p, s in core.touched(cstate["scale"]).items():
        z = core.touched(cstate["zero"])[p]
        assert z.dtype == jnp.uint8
        q = np.asarray(eff[p]) / np.asarray(s)[None] + np.asarray(z, np.float32)[None]
        np.testing.assert_allclose(q, np.round(q), atol=1e-3)
        assert q.min() > -0.01 and q.max() < 15.01
        np.testing.assert_allclose(s, qgrid.fit(core.touched(state["params"])[p], grid)[0], rtol=1e-6)


def test_qat_gradient_reaches_params():
    _, params = tiny()
    t = qat.qat(8)
    state = t.init(params, jax.random.key(0), None)
    g = jax.grad(lambda p: sum(jnp.sum(x) for x in jax.tree.leaves(t.apply(p, state))))(params)
    np.testing.assert_array_equal(g["layers"][0]["attn"]["q"]["kernel"], 1.0)  # fitted range: nothing clips


@pytest.mark.parametrize("bits", [0, 1, 9, 1.5, True, "4"])
def test_bad_bits_are_user_errors(bits):
    with pytest.raises(errors.UserError, match="bits must be in 2..8"):
        rtn.rtn(bits)
    with pytest.raises(errors.UserError, match="bits must be in 2..8"):
        qat.qat(bits)


def test_bad_arguments_are_user_errors():
    with pytest.raises(errors.UserError, match="granularity"):
        rtn.rtn(4, granularity="rows")
    with pytest.raises(errors.UserError, match="group_size"):
        qat.qat(4, granularity="group", group_size=0)
    with pytest.raises(errors.UserError, match="not a valid regex"):
        rtn.rtn(4, where="layers/(")
    _, params = tiny()
    with pytest.raises(errors.UserError, match=r"group size 48 exceeds the input dimension 32"):
        rtn.rtn(4, granularity="group", group_size=48).init(params, jax.random.key(0), None)
    with pytest.raises(errors.UserError, match="group size 48 exceeds the input dimension 32"):
        qat.qat(4, granularity="group", group_size=48).init(params, jax.random.key(0), None)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("make", [rtn.rtn, qat.qat])
def test_non_finite_weights_are_user_errors_naming_the_leaf(bad, make):
    _, params = tiny()
    params["layers"][0]["mlp"]["up"]["kernel"] = params["layers"][0]["mlp"]["up"]["kernel"].at[3, 5].set(bad)
    with pytest.raises(errors.UserError, match="layers/0/mlp/up/kernel holds NaN or Inf"):
        make(4).init(params, jax.random.key(0), None)


def test_qat_composes_with_masks_and_codebooks():
    # prune -> share (trained centroids) -> fake-quantize: the gradient reaches the centroids through QAT's
    # straight-through estimator, pruned weights stay exactly zero, the forward pass sees QAT's grid.
    from research.compress.share import codebook

    graphdef, params = tiny()
    t = core.chain(magnitude.magnitude(0.5), codebook.codebook(4, lr=1e-2), qat.qat(8))
    cstate = t.init(params, jax.random.key(0), None)
    books0 = {p: np.asarray(b) for p, b in core.touched(cstate[1]["codebook"]).items()}
    tx = core.keep_masked(optax.adam(1e-2))
    state = {**train_step.init_state(params, tx), "compress": cstate}
    step = train_step.make_train_step(graphdef, tx, seed=0, dropout=False, transform=t)
    tokens = jax.random.randint(jax.random.key(1), (4, 17), 0, 64)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    losses = []
    for _ in range(20):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    cs = state["compress"]
    eff, masks = core.touched(t.apply(state["params"], cs)), core.touched(t.masks(cs))
    for p, book in core.touched(cs[1]["codebook"]).items():
        assert np.abs(np.asarray(book) - books0[p]).max() > 0  # the centroids trained
        assert (np.asarray(eff[p])[~np.asarray(masks[p])] == 0).all()
        s, z = np.asarray(core.touched(cs[2]["scale"])[p]), np.asarray(core.touched(cs[2]["zero"])[p], np.float32)
        q = np.asarray(eff[p]) / s[None] + z[None]
        np.testing.assert_allclose(q, np.round(q), atol=1e-3)
