"""Weight sharing: 1-D k-means (Lloyd and the exact DP) and the codebook transform, including fine-tuning."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from research import codes, errors, models
from research.compress import core
from research.compress.prune import magnitude
from research.compress.share import codebook, kmeans
from research.models import config
from research.train import step as train_step

# Optimal 3-clustering by hand: {0, .1, .3} (mean 2/15), {5, 5.1}, {10}; inertia 0.04667 + 0.005.
HAND = np.array([0.0, 0.1, 0.3, 5.0, 5.1, 10.0], np.float32)
HAND_BOOK = [2 / 15, 5.05, 10.0]
HAND_INERTIA = (2 / 15) ** 2 + (0.1 - 2 / 15) ** 2 + (0.3 - 2 / 15) ** 2 + 2 * 0.05**2


@pytest.mark.parametrize("init", kmeans.INITS)
def test_indices_are_nearest_centroid(init):
    x = jax.random.normal(jax.random.key(1), (3, 300))
    cb, idx, inertia = kmeans.fit(x, 8, init=init, key=jax.random.key(2))
    assert cb.shape == (3, 8) and idx.shape == (3, 300) and idx.dtype == jnp.uint8
    brute = np.argmin(np.abs(np.asarray(x)[:, :, None] - np.asarray(cb)[:, None, :]), axis=-1)
    np.testing.assert_array_equal(np.asarray(idx), brute)
    want = ((np.asarray(x) - np.take_along_axis(np.asarray(cb), brute, 1)) ** 2).sum(1)
    np.testing.assert_allclose(inertia, want, rtol=1e-5)


def test_hand_clusters_optimal_and_lloyd():
    cb, idx, inertia = kmeans.optimal(HAND, 3)
    np.testing.assert_allclose(cb, HAND_BOOK, rtol=1e-6)
    np.testing.assert_array_equal(idx, [0, 0, 0, 1, 1, 2])
    assert inertia == pytest.approx(HAND_INERTIA, rel=1e-5)
    cb2, idx2, inertia2 = kmeans.fit(HAND[None], 3, init="linear")
    np.testing.assert_allclose(cb2[0], HAND_BOOK, rtol=1e-6)
    np.testing.assert_array_equal(idx2[0], [0, 0, 0, 1, 1, 2])
    assert float(inertia2[0]) == pytest.approx(HAND_INERTIA, rel=1e-5)
    # k=4 by hand: splitting {0, .1, .3} into {0, .1}, {.3} (cost .005) beats splitting {5, 5.1}.
    cb4, _, inertia4 = kmeans.optimal(HAND, 4)
    np.testing.assert_allclose(cb4, [0.05, 0.3, 5.05, 10.0], rtol=1e-6)
    assert inertia4 == pytest.approx(0.01, rel=1e-4)


@pytest.mark.parametrize("init", kmeans.INITS)
def test_lloyd_inertia_at_least_optimal(init):
    x = jax.random.normal(jax.random.key(3), (2, 200)) ** 3
    _, _, inertia = kmeans.fit(x, 4, init=init, key=jax.random.key(0))
    for p in range(2):
        assert float(inertia[p]) >= kmeans.optimal(x[p], 4)[2] * (1 - 1e-5)


def _brute_lloyd(x, w, c, iters):
    """Textbook Lloyd in float64 over every value (no relocation): the reference for the sorted-run version."""
    x, w, c = np.asarray(x, np.float64), np.asarray(w, np.float64), np.sort(np.asarray(c, np.float32))
    for _ in range(iters):
        mid = 0.5 * (c[1:] + c[:-1])  # float32 midpoints, as kmeans.assign
        idx = np.searchsorted(mid, x.astype(np.float32), side="left")
        wsum, xsum = np.bincount(idx, w, len(c)), np.bincount(idx, w * x, len(c))
        assert np.all(wsum > 0), "the reference case must keep every cluster non-empty"
        new = np.sort((xsum / wsum).astype(np.float32))
        if np.array_equal(new, c):
            break
        c = new
    return c


def test_sorted_lloyd_equals_textbook_lloyd():
    rng = np.random.default_rng(0)
    x = (rng.standard_t(3, (4, 2000)) * 0.02).astype(np.float32)
    w = rng.uniform(0.1, 2.0, x.shape).astype(np.float32)
    for weights in (None, w):
        cb, idx, inertia = kmeans.fit(x, 8, weights=weights, init="density")
        for p in range(4):
            wp = np.ones(x.shape[1]) if weights is None else w[p]
            s = np.sort(x[p])
            c0 = s[
                np.minimum(
                    np.searchsorted(np.cumsum(wp[np.argsort(x[p])]), (np.arange(8) + 0.5) / 8 * wp.sum()), len(s) - 1
                )
            ]
            want = _brute_lloyd(x[p], wp, c0, 300)
            np.testing.assert_allclose(cb[p], want, rtol=1e-6, atol=1e-9)
            err = ((x[p].astype(np.float64) - np.asarray(cb[p], np.float64)[np.asarray(idx[p])]) ** 2 * wp).sum()
            assert float(inertia[p]) == pytest.approx(err, rel=1e-5)


def test_empty_clusters_are_relocated():
    # Linear init over [0, 10] puts centroids at 0, 5, 10: the middle one owns nothing. It moves to the value
    # farthest from its centroid in the worst cluster ({0, .1, 1, 1.1}, mean .55), and Lloyd then reaches the
    # optimum {0, .1}, {1, 1.1}, {10}; without relocation it would stop at inertia 1.01.
    x = np.array([[0.0, 0.1, 1.0, 1.1, 10.0]], np.float32)
    cb, idx, inertia = kmeans.fit(x, 3, init="linear")
    np.testing.assert_allclose(cb[0], [0.05, 1.05, 10.0], rtol=1e-6)
    np.testing.assert_array_equal(idx[0], [0, 0, 1, 1, 2])
    assert float(inertia[0]) == pytest.approx(kmeans.optimal(x[0], 3)[2], rel=1e-5)


def test_small_clusters_are_exact_among_a_million_values():
    # Values around 1.0 (like norm scales) and a lone outlier: its cluster's centroid must be the value itself.
    # Differences of float32 prefix sums (~1e6 by the end) would miss it by ~0.06.
    x = np.random.default_rng(1).normal(1.0, 0.02, 1_000_000).astype(np.float32)
    x[123] = 1.53
    cb, _, _ = kmeans.fit(x[None], 16, init="linear")  # the top centroid starts at 1.53, alone
    assert float(cb[0, -1]) == np.float32(1.53)


def test_weighted_kmeans_moves_toward_heavy_weights():
    x = jnp.array([[0.0, 1.0, 10.0, 11.0]])
    cb, _, _ = kmeans.fit(x, 2)
    np.testing.assert_allclose(cb[0], [0.5, 10.5])
    w = jnp.array([[3.0, 1.0, 1.0, 4.0]])
    cb, _, inertia = kmeans.fit(x, 2, weights=w)
    np.testing.assert_allclose(cb[0], [0.25, 10.8], rtol=1e-6)
    assert float(inertia[0]) == pytest.approx(3 * 0.25**2 + 0.75**2 + 0.8**2 + 4 * 0.2**2, rel=1e-5)
    cb_opt, _, _ = kmeans.optimal(x[0], 2, weights=w[0])
    np.testing.assert_allclose(cb_opt, [0.25, 10.8], rtol=1e-6)


def test_invalid_values_take_part_in_nothing():
    x = jnp.array([[0.0, 1.0, 100.0, 10.0, 11.0]])
    valid = jnp.array([[True, True, False, True, True]])
    cb, idx, inertia = kmeans.fit(x, 2, valid=valid)
    np.testing.assert_allclose(cb[0], [0.5, 10.5])
    assert int(idx[0, 2]) == 0 and float(inertia[0]) == pytest.approx(1.0)


def test_few_distinct_values_fall_back_with_warning(caplog):
    x = jnp.array([[1.0, 2.0, 2.0, 1.0, 3.0]])
    with caplog.at_level(logging.WARNING):
        cb, idx, inertia = kmeans.fit(x, 4)
    assert "distinct" in caplog.text
    np.testing.assert_allclose(cb[0], [1.0, 2.0, 3.0, 3.0])
    np.testing.assert_array_equal(idx[0], [0, 1, 1, 0, 2])
    assert float(inertia[0]) == 0.0
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        cb, _, _ = kmeans.optimal(x[0], 8)
    assert "distinct" in caplog.text and cb.shape == (8,)


def test_bad_inputs():
    for bits in (0, 9, 2.5):
        with pytest.raises(errors.UserError):
            codebook.codebook(bits)
        with pytest.raises(errors.UserError):
            kmeans.entries(bits)
    with pytest.raises(errors.UserError):
        codebook.codebook(4, granularity="column")
    with pytest.raises(errors.UserError):
        kmeans.fit(jnp.array([[0.0, jnp.nan, 1.0]]), 2)
    with pytest.raises(errors.UserError, match="Lloyd"):
        kmeans.optimal(jnp.zeros(5000), 4)
    params = {"layers": {0: {"mlp": {"up": {"kernel": jnp.ones((6, 4))}}}}}
    with pytest.raises(errors.UserError, match="divide"):
        codebook.codebook(2, granularity="group", group_size=4).init(params, jax.random.key(0), None)
    nan = {"layers": {0: {"mlp": {"up": {"kernel": jnp.full((4, 4), jnp.nan)}}}}}
    with pytest.raises(errors.UserError, match="NaN"):
        codebook.codebook(2).init(nan, jax.random.key(0), None)


def _kernel_params(w):
    return {"layers": {0: {"mlp": {"up": {"kernel": w, "bias": jnp.zeros(w.shape[-1])}}}}}


@pytest.mark.parametrize(("granularity", "rows"), [("tensor", 1), ("channel", 8), ("group", 8 * 64 // 16)])
def test_codebook_shapes_and_sharing(granularity, rows):
    w = jax.random.normal(jax.random.key(0), (64, 8))
    params = _kernel_params(w)
    t = codebook.codebook(2, granularity=granularity, group_size=16)
    state = t.init(params, jax.random.key(0), None)
    cb = state["codebook"]["layers"][0]["mlp"]["up"]["kernel"]
    idx = state["indices"]["layers"][0]["mlp"]["up"]["kernel"]
    assert cb.shape == (rows, 4) and cb.dtype == jnp.float32
    assert idx.shape == (64, 8) and idx.dtype == jnp.uint8
    assert state["codebook"]["layers"][0]["mlp"]["up"]["bias"] is None
    eff = t.apply(params, state)["layers"][0]["mlp"]["up"]["kernel"]
    lay = codes.Layout.of(granularity, 16)
    problems = lay.to_problems(eff)
    for r in range(rows):
        assert set(np.asarray(problems[r]).tolist()) <= set(np.asarray(cb[r]).tolist())
    np.testing.assert_array_equal(lay.from_problems(lay.to_problems(w), w.shape), w)
    if granularity == "group":  # row o * (in / g) + j holds kernel[j*g:(j+1)*g, o]
        np.testing.assert_array_equal(lay.to_problems(w)[1 * 4 + 2], w[32:48, 1])


def test_centroid_gradient_is_the_sum_over_its_kept_weights():
    w = jnp.array([[1.0, -1.0], [1.1, 0.0], [-0.9, 2.0]])  # (in 3, out 2); w[1, 1] is pruned
    params = _kernel_params(w)
    t = codebook.codebook(1, lr=0.5)
    state = t.init(params, jax.random.key(0), None)
    cb = state["codebook"]["layers"][0]["mlp"]["up"]["kernel"]
    idx = state["indices"]["layers"][0]["mlp"]["up"]["kernel"]
    np.testing.assert_allclose(cb[0], [-0.95, 1.3666667], rtol=1e-6)
    np.testing.assert_array_equal(idx, [[1, 0], [1, 0], [0, 1]])
    target = jnp.arange(6.0).reshape(3, 2)

    def loss(p, s):
        eff = t.apply(p, s)["layers"][0]["mlp"]["up"]["kernel"]
        return jnp.sum(target * eff)

    grads, sgrads = jax.grad(loss, argnums=(0, 1), allow_int=True)(params, state)
    g = grads["layers"][0]["mlp"]["up"]["kernel"]
    np.testing.assert_allclose(g, target * jnp.array([[1, 1], [1, 0], [1, 1]]))  # dL/d(effective), 0 where pruned
    new = t.learn(state, sgrads, 1)
    # centroid 0 holds w[0,1], w[2,0] (grads 1 + 4); centroid 1 holds w[0,0], w[1,0], w[2,1] (0 + 2 + 5).
    np.testing.assert_allclose(
        new["codebook"]["layers"][0]["mlp"]["up"]["kernel"][0], cb[0] - 0.5 * jnp.array([5.0, 7.0])
    )
    np.testing.assert_array_equal(new["indices"]["layers"][0]["mlp"]["up"]["kernel"], idx)
    static = codebook.codebook(1, trained=False)
    s = static.init(params, jax.random.key(0), None)
    assert static.learn is None and static.update(params, s, grads, 1) is s


def test_prune_then_share_finetune_keeps_zeros_and_indices():
    cfg = config.gpt2_style(vocab_size=64, n_layer=1, n_head=2, d_model=32, max_seq_len=16)
    graphdef, params = models.init(cfg)
    t = core.chain(magnitude.magnitude(0.5), codebook.codebook(4, lr=1e-2))
    tx = core.keep_masked(optax.adamw(1e-3))
    cs = t.init(params, jax.random.key(0), None)
    eff0 = core.touched(t.apply(params, cs))
    masks = core.touched(t.masks(cs))
    share0 = jax.tree.map(np.asarray, cs[1])  # the step donates its input state
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params), "compress": cs}
    step = train_step.make_train_step(graphdef, tx, seed=0, dropout=False, transform=t)
    for i in range(100):
        tokens = jax.random.randint(jax.random.key(i), (2, 4, 16), 0, 64)
        state, _ = step(state, {"inputs": tokens[0], "targets": tokens[1]})
    share1 = state["compress"][1]
    eff = core.touched(t.apply(state["params"], state["compress"]))
    for path, mask in masks.items():
        assert bool(jnp.all(eff0[path][~mask] == 0)) and bool(jnp.all(eff[path][~mask] == 0))
        assert len(np.unique(np.asarray(eff[path][mask]))) <= 16
        np.testing.assert_array_equal(core.touched(share1["indices"])[path], core.touched(share0["indices"])[path])
        assert core.touched(share1["indices"])[path].dtype == jnp.uint8
        assert not np.allclose(core.touched(share1["codebook"])[path], core.touched(share0["codebook"])[path])


def test_reassign_moves_indices_to_nearest_centroid():
    w = jnp.array([[-1.0, 1.0], [2.0, 3.0]])  # centroids -> 0, 2.5
    params = _kernel_params(w)
    t = codebook.codebook(1, lr=0.0, reassign_every=2)
    state = t.init(params, jax.random.key(0), None)
    moved = _kernel_params(jnp.array([[3.0, 1.0], [2.0, 0.1]]))
    grads = jax.tree.map(jnp.zeros_like, params)
    same = t.update(moved, state, grads, jnp.int32(1))
    np.testing.assert_array_equal(same["indices"]["layers"][0]["mlp"]["up"]["kernel"], [[0, 0], [1, 1]])
    new = t.update(moved, state, grads, jnp.int32(2))
    np.testing.assert_array_equal(new["indices"]["layers"][0]["mlp"]["up"]["kernel"], [[1, 0], [1, 0]])


def test_codebook_entries_can_be_stored_in_half_precision():
    w = jax.random.normal(jax.random.key(3), (64, 8)) * 0.1
    params = {"a": {"kernel": w}}
    for dtype in ("float16", "bfloat16"):
        t = codebook.codebook(3, where="a/kernel", granularity="channel", entry_dtype=dtype)
        state = t.init(params, jax.random.key(0), None)
        eff = np.asarray(t.apply(params, state)["a"]["kernel"])
        np.testing.assert_array_equal(eff, eff.astype(dtype).astype(np.float32))  # every value is a stored entry
        assert len(np.unique(eff[:, 0])) <= 8
    # int8 entries: every column's values are integer multiples of its own scale max|entry| / 127.
    t = codebook.codebook(3, where="a/kernel", granularity="channel", entry_dtype="int8")
    state = t.init(params, jax.random.key(0), None)
    eff = np.asarray(t.apply(params, state)["a"]["kernel"], np.float64)
    scale = np.abs(np.asarray(state["codebook"]["a"]["kernel"])).max(1) / 127  # (8,) one per column
    codes = eff / scale[None, :]
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
    assert np.abs(codes).max() <= 127 + 1e-4
    full = codebook.codebook(3, where="a/kernel", granularity="channel")  # same fit, float32 entries
    exact = np.asarray(full.apply(params, full.init(params, jax.random.key(0), None))["a"]["kernel"])
    assert 0 < np.abs(eff - exact).max() <= scale.max() / 2 * (1 + 1e-5)  # rounded by at most half a step
    with pytest.raises(errors.UserError, match="entry_dtype must be one of"):
        codebook.codebook(3, entry_dtype="int4")


def test_fisher_weighted_codebooks_follow_the_sensitive_weights():
    from research.compress import calib

    cfg = config.gpt2_style(vocab_size=64, n_layer=1, n_head=2, d_model=32, max_seq_len=16)
    graphdef, params = models.init(cfg)
    data = calib.Calibration(graphdef, calib.sample(np.arange(3000) % 64, 8, 16, seed=0), batch_size=4)
    where = "layers/0/mlp/up/kernel"
    with pytest.raises(errors.UserError, match="needs calibration data"):
        codebook.codebook(2, where=where, weighting="fisher").init(params, jax.random.key(0), None)
    plain = codebook.codebook(2, where=where, weighting="none").init(params, jax.random.key(0), data)
    fish = codebook.codebook(2, where=where, weighting="fisher").init(params, jax.random.key(0), data)
    f = np.asarray(calib.fisher(data, params)["layers"][0]["mlp"]["up"]["kernel"]).ravel()
    w = np.asarray(params["layers"][0]["mlp"]["up"]["kernel"]).ravel()

    def weighted_error(state):
        cb = np.asarray(state["codebook"]["layers"][0]["mlp"]["up"]["kernel"])[0]
        idx = np.asarray(state["indices"]["layers"][0]["mlp"]["up"]["kernel"]).ravel()
        return float(np.sum(f * (w - cb[idx]) ** 2))

    assert weighted_error(fish) < weighted_error(plain)  # the objective the Fisher weights ask for
    with pytest.raises(errors.UserError, match="weighting must be one of"):
        codebook.codebook(2, weighting="hessian")
