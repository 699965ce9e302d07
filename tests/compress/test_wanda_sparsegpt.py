"""Wanda and SparseGPT: the formulas on hand-checked layers, reconstruction against magnitude, N:M, the layer-wise
walk on a tiny model, and the failure modes (no calibration, bad shapes, indefinite Hessians)."""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import errors, models, tree
from research.compress import calib, core, hessian
from research.compress.prune import magnitude, masks, sparsegpt, wanda
from research.models import config as model_config

KEY = jax.random.key(0)


def obs_reference(kernel, hessian, sparsity, blocksize, nm=None, percdamp=0.01):
    """SparseGPT without lazy updates, in float64 numpy: every column's error goes to all later columns at once."""
    w = np.array(kernel, np.float64).T.copy()  # (out, in)
    h = np.array(hessian, np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += percdamp * np.mean(np.diag(h)) * np.eye(len(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    d = np.diag(u)
    keep = np.ones_like(w, bool)
    for i1 in range(0, w.shape[1], blocksize):
        i2 = min(i1 + blocksize, w.shape[1])
        if nm is None:
            s = (w[:, i1:i2] ** 2 / d[i1:i2] ** 2).reshape(-1)
            kept = np.argsort(-s, kind="stable")[: s.size - int(round(sparsity * s.size))]
            keep[:, i1:i2] = np.isin(np.arange(s.size), kept).reshape(w.shape[0], i2 - i1)
        for i in range(i1, i2):
            if nm is not None and (i - i1) % nm[1] == 0:
                s = w[:, i : i + nm[1]] ** 2 / d[i : i + nm[1]] ** 2
                group = np.zeros_like(s, bool)
                np.put_along_axis(group, np.argsort(-s, axis=1, kind="stable")[:, : nm[0]], True, axis=1)
                keep[:, i : i + nm[1]] = group
            q = np.where(keep[:, i], w[:, i], 0.0)
            w[:, i:] -= np.outer((w[:, i] - q) / d[i], u[i, i:])
            w[:, i] = q
    return w.T, keep.T


def correlated_layer(din=64, dout=32, rows=4096, seed=0):
    """(X (rows, din) with strongly correlated features, kernel (din, dout))."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(din, din)) * np.exp(rng.normal(size=(din, 1)))  # features = mixtures of shared factors
    x = rng.normal(size=(rows, din)) @ mix
    kernel = rng.normal(size=(din, dout)) / np.sqrt(din)
    return x.astype(np.float32), kernel.astype(np.float32)


def output_error(x, kernel, new):
    return float(np.linalg.norm(x @ np.asarray(kernel, np.float64) - x @ np.asarray(new, np.float64)))


# ----- Wanda -----


def test_wanda_scores_and_per_output_mask_by_hand():
    w = jnp.asarray([[1.0, -4, 2, 0.5], [-2, 1, 3, 1], [3, 2, -1, 2], [0.5, 3, 1, -3]])  # (in 4, out 4)
    sqnorm = jnp.asarray([16.0, 1, 0.25, 4])  # input norms 4, 1, 0.5, 2
    expected = np.asarray([[4.0, 16, 8, 2], [2, 1, 3, 1], [1.5, 1, 0.5, 1], [1, 6, 2, 6]])
    np.testing.assert_allclose(wanda.scores(w, sqnorm), expected)
    mask = masks.from_scores({"w": wanda.scores(w, sqnorm)}, 0.5, group="output")["w"]
    keep = [[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 1]]  # per column: the two highest |w| * ||x||
    np.testing.assert_array_equal(mask, np.asarray(keep, bool))
    magnitude_only = masks.from_scores({"w": jnp.abs(w)}, 0.5, group="output")["w"]
    assert not np.array_equal(magnitude_only, mask)  # the activation norms change the choice


@pytest.mark.parametrize("sparsity, kept", [(0.5, 32), (0.3, 45), (0.9, 6)])
def test_wanda_per_output_keeps_the_count_in_every_column(sparsity, kept):
    x, kernel = correlated_layer(rows=256)
    s = wanda.scores(jnp.asarray(kernel), jnp.asarray((x * x).sum(0)))
    mask = np.asarray(masks.from_scores({"w": s}, sparsity, group="output")["w"])  # (64, 32)
    assert (mask.sum(axis=0) == kept).all()  # 64 - round(sparsity * 64)


# ----- SparseGPT on one layer -----


@pytest.mark.parametrize(
    "din, blocksize, pattern, ref_blocksize",
    [
        (40, 16, None, 16),  # a partial last block (padded)
        (40, 128, None, 128),
        (40, 16, "2:4", 16),
        (48, 16, "1:3", 15),  # blocks rounded down to a multiple of M
    ],
)
def test_sparsegpt_equals_unbatched_obs(din, blocksize, pattern, ref_blocksize):
    x, kernel = correlated_layer(din=din, dout=12, rows=500)
    x[:, 3] = 0  # a dead input
    h = x.T @ x
    new, keep = sparsegpt.prune_layer(jnp.asarray(kernel), jnp.asarray(h), 0.5, pattern, blocksize)
    ref_new, ref_keep = obs_reference(kernel, h, 0.5, ref_blocksize, masks.parse_pattern(pattern))
    np.testing.assert_array_equal(keep, ref_keep)
    np.testing.assert_allclose(new, ref_new, atol=1e-4, rtol=1e-3)
    assert not np.asarray(new)[3].any() and not np.asarray(keep)[3].any()  # dead input pruned and zero
    assert np.mean(np.asarray(keep)) == (0.5 if pattern is None else np.divide(*masks.parse_pattern(pattern)))
    assert (np.asarray(new)[~np.asarray(keep)] == 0).all()


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(pattern):
    x, kernel = correlated_layer()
    k = jnp.asarray(kernel)
    new, _ = sparsegpt.prune_layer(k, jnp.asarray(x.T @ x), 0.5, pattern)
    mag = masks.from_scores({"w": jnp.abs(k)}, 0.5, pattern=pattern)
    wan = masks.from_scores({"w": wanda.scores(k, jnp.asarray((x * x).sum(0)))}, 0.5, group="output", pattern=pattern)
    errs = {
        "sparsegpt": output_error(x, kernel, new),
        "magnitude": output_error(x, kernel, np.where(mag["w"], kernel, 0)),
        "wanda": output_error(x, kernel, np.where(wan["w"], kernel, 0)),
    }
    assert errs["sparsegpt"] < 0.8 * min(errs["magnitude"], errs["wanda"]), errs


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_nm_exactly_n_nonzeros_in_every_group(pattern):
    n, m = masks.parse_pattern(pattern)
    x, kernel = correlated_layer(rows=512)
    new, keep = sparsegpt.prune_layer(jnp.asarray(kernel), jnp.asarray(x.T @ x), 0.5, pattern, blocksize=32)
    s = wanda.scores(jnp.asarray(kernel), jnp.asarray((x * x).sum(0)))
    wanda_kernel = np.where(masks.from_scores({"w": s}, 0.5, pattern=pattern)["w"], kernel, 0)
    for pruned in (np.asarray(new), wanda_kernel):
        groups = (pruned != 0).reshape(64 // m, m, 32)  # m consecutive inputs of each output
        assert (groups.sum(axis=1) == n).all()
    assert (np.asarray(keep).reshape(64 // m, m, 32).sum(axis=1) == n).all()


# ----- the tiny model -----


@pytest.fixture(scope="module")
def tiny():
    """(graphdef, params, calibration) of a 2-layer model whose blocks dominate its output (kernels scaled x8)."""
    cfg = model_config.gpt2_style(vocab_size=256, n_layer=2, n_head=2, d_model=32, max_seq_len=32)
    graphdef, params = models.init(cfg)
    params = tree.map_with_path(lambda p, x: 8 * x if re.fullmatch(core.BLOCK_KERNELS, p) else x, params)
    tokens = np.random.default_rng(0).integers(0, 256, 10_000)
    return graphdef, params, calib.Calibration(graphdef, calib.sample(tokens, 16, 32, max_len=32), batch_size=8)


def block0_input(graphdef, params, inputs):
    """(N*L, D) input of layer 0's attention projections: attn_norm(embed_tokens(tokens))."""
    model = models.merge(graphdef, params)
    tokens = jnp.asarray(inputs)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = model.layers[0].attn_norm(model.embed_tokens(tokens, positions))
    return np.asarray(x, np.float64).reshape(-1, x.shape[-1]), model, x, positions


def test_walk_hessian_is_xtx_of_the_block_input(tiny):
    graphdef, params, c = tiny
    x, *_ = block0_input(graphdef, params, c.inputs)
    seen = {}

    def visit(i, stats, n_tokens, kernels):
        seen[i] = (stats, n_tokens)
        return kernels

    calib.walk(c, params, ["layers/0/attn/q/kernel"], visit, stat="hessian")
    stats, n_tokens = seen[0]
    assert n_tokens == x.shape[0] == 16 * 32
    np.testing.assert_allclose(stats["attn/q"], x.T @ x, rtol=1e-4, atol=1e-3)
    calib.walk(c, params, ["layers/0/attn/q/kernel"], visit, stat="sqnorm")
    np.testing.assert_allclose(seen[0][0]["attn/q"], (x * x).sum(0), rtol=1e-4)


def test_walk_runs_no_block_after_the_last_selected_one(tiny, monkeypatch):
    graphdef, params, c = tiny
    calls = []
    run = calib._run_block
    monkeypatch.setattr(calib, "_run_block", lambda *a: calls.append(a[4]) or run(*a))
    calib.walk(c, params, ["layers/0/mlp/up/kernel"], lambda i, s, n, k: k, stat="sqnorm")
    assert calls == ["sqnorm", "sqnorm"]  # block 0's statistics for the two batches; block 1 is never run
    calls.clear()
    calib.walk(c, params, ["layers/1/mlp/up/kernel"], lambda i, s, n, k: k, stat="sqnorm")
    assert calls == [None, None, "sqnorm", "sqnorm"]  # block 0 propagates, block 1 gives statistics


METHODS = {"magnitude": magnitude.magnitude, "wanda": wanda.wanda, "sparsegpt": sparsegpt.sparsegpt}


@pytest.fixture(scope="module")
def pruned(tiny):
    """pruned(method, pattern) -> (transform, state) at 50%, computed once; SparseGPT's Hessians are recorded in
    pruned.hessians."""
    _, params, c = tiny
    cache, hessians = {}, {}
    prune_layer = sparsegpt.prune_layer

    def recording(kernel, hessian, *args):
        hessians.setdefault(args[-1], np.asarray(hessian))
        return prune_layer(kernel, hessian, *args)

    def get(method, pattern=None):
        if (method, pattern) not in cache:
            t = METHODS[method](0.5, pattern=pattern)
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(sparsegpt, "prune_layer", recording)
                cache[method, pattern] = t, t.init(params, KEY, c)
        return cache[method, pattern]

    get.hessians = hessians
    return get


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_layer0_matches_the_direct_computation(tiny, pruned, method):
    graphdef, params, c = tiny
    x, *_ = block0_input(graphdef, params, c.inputs)
    kernel = params["layers"][0]["attn"]["q"]["kernel"]
    t, state = pruned(method)
    got_mask = state["masks"]["layers"][0]["attn"]["q"]["kernel"]
    got = t.apply(params, state)["layers"][0]["attn"]["q"]["kernel"]
    if method == "wanda":
        s = wanda.scores(kernel, jnp.asarray((x * x).sum(0), jnp.float32))
        want_mask = masks.from_scores({"q": s}, 0.5, group="output")["q"]
        want = jnp.where(want_mask, kernel, 0)
    else:
        want, want_mask = sparsegpt.prune_layer(kernel, jnp.asarray(x.T @ x, jnp.float32), 0.5)
    np.testing.assert_array_equal(got_mask, want_mask)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def test_sparsegpt_calibrates_later_blocks_on_pruned_outputs(tiny, pruned):
    graphdef, params, c = tiny
    t, state = pruned("sparsegpt")
    _, model, _, positions = block0_input(graphdef, t.apply(params, state), c.inputs)
    x1, _ = model.layers[0](model.embed_tokens(jnp.asarray(c.inputs), positions), positions)  # pruned block 0
    x = np.asarray(model.layers[1].attn_norm(x1), np.float64).reshape(-1, 32)
    np.testing.assert_allclose(pruned.hessians["layers/1/attn/q/kernel"], x.T @ x, rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_end_to_end_sparsity_finite_and_closer_to_dense_than_magnitude(tiny, pruned, pattern):
    graphdef, params, c = tiny
    tokens = jnp.asarray(c.inputs)

    def log_probs(p):
        return jax.nn.log_softmax(models.merge(graphdef, p)(tokens))  # (N, L, V)

    dense = log_probs(params)
    kl = {}
    for name in METHODS:
        t, state = pruned(name, pattern)
        effective = t.apply(params, state)
        paths = core.select(params, core.BLOCK_KERNELS)
        sparsity = masks.sparsity_of(t.masks(state))
        assert set(sparsity) == {*paths, "total"}
        assert all(s == 0.5 for s in sparsity.values()), sparsity
        flat, eff = tree.flatten(params), tree.flatten(effective)
        for p in flat:
            assert np.isfinite(eff[p]).all()
            if p not in paths:
                np.testing.assert_array_equal(eff[p], flat[p])
        for p in paths:
            assert np.mean(np.asarray(eff[p]) == 0) == 0.5
        kl[name] = float(jnp.mean(jnp.sum(jnp.exp(dense) * (dense - log_probs(effective)), -1)))
    # Expected next-token loss under the dense model's own predictions = its entropy + this KL.
    assert kl["sparsegpt"] < kl["magnitude"], kl


def test_sparsegpt_apply_trains_params_with_fixed_delta(tiny):
    graphdef, params, c = tiny
    t = sparsegpt.sparsegpt(0.5, where=r"layers/0/mlp/up/kernel")
    state = t.init(params, KEY, c)
    path = ["layers", 0, "mlp", "up", "kernel"]
    mask, delta = (tree.flatten(state[k])["layers/0/mlp/up/kernel"] for k in ("masks", "delta"))
    assert tree.flatten(state["delta"]).keys() == {"layers/0/mlp/up/kernel"}
    assert (np.asarray(delta)[~np.asarray(mask)] == 0).all()

    def total(p):
        eff = t.apply(p, state)
        x = eff
        for k in path:
            x = x[k]
        return jnp.sum(x**2)

    grads = jax.grad(total)(params)
    g = np.asarray(grads["layers"][0]["mlp"]["up"]["kernel"])
    assert (g[~np.asarray(mask)] == 0).all() and (g[np.asarray(mask)] != 0).all()


# ----- errors -----


@pytest.mark.parametrize("factory", [wanda.wanda, sparsegpt.sparsegpt])
def test_errors_without_calibration_or_with_bad_options(tiny, factory):
    graphdef, params, c = tiny
    with pytest.raises(errors.UserError, match="needs calibration data"):
        factory(0.5).init(params, KEY, None)
    with pytest.raises(errors.UserError, match="do not divide the input dimension 32"):
        factory(pattern="2:3").init(params, KEY, c)
    for bad in (dict(sparsity=1.0), dict(sparsity="half"), dict(pattern="4:2"), dict(pattern="2-4")):
        with pytest.raises(errors.UserError):
            factory(**bad)
    with pytest.raises(errors.UserError, match="is not a linear kernel inside a block"):
        factory(where=r"layers/0/attn_norm/scale|layers/0/attn/q/kernel").init(params, KEY, c)


def test_bad_options_and_shapes_of_prune_layer():
    k, h = jnp.ones((6, 4)), jnp.eye(6)
    with pytest.raises(errors.UserError, match="do not divide the input dimension 6"):
        sparsegpt.prune_layer(k, h, 0.5, "2:4")
    with pytest.raises(errors.UserError, match="Hessian is"):
        sparsegpt.prune_layer(k, jnp.eye(5), 0.5)
    for bad in (dict(blocksize=0), dict(blocksize=2.5), dict(percdamp=-1.0), dict(percdamp=float("nan"))):
        with pytest.raises(errors.UserError):
            sparsegpt.sparsegpt(**bad)
    with pytest.raises(errors.UserError):
        wanda.wanda(group="row")


def test_indefinite_hessian_falls_back_to_more_damping(caplog):
    h = 3.0 * jnp.ones((8, 8)) - 2.0 * jnp.eye(8)  # diagonal 1, eigenvalues 22 and -2 (x7)
    kernel = jax.random.normal(KEY, (8, 4))
    with caplog.at_level(logging.WARNING, logger=hessian.__name__):
        new, keep = sparsegpt.prune_layer(kernel, h, 0.5, name="toy")
    assert np.isfinite(new).all() and np.mean(np.asarray(keep)) == 0.5
    assert "toy is not positive definite with percdamp 0.01; used percdamp 10" in caplog.text  # -2 + 10 > 0


def test_hopeless_hessians_raise_and_never_return_nan():
    kernel = jax.random.normal(KEY, (8, 4))
    with pytest.raises(errors.UserError, match="not positive definite even with percdamp"):
        sparsegpt.prune_layer(kernel, -5.0 * jnp.eye(8), 0.5)  # damping scales with the negative diagonal
    with pytest.raises(errors.UserError, match="NaN/inf"):
        sparsegpt.prune_layer(kernel, jnp.full((8, 8), jnp.nan), 0.5)
    new, keep = sparsegpt.prune_layer(kernel, jnp.zeros((8, 8)), 0.5, percdamp=0.0)  # all inputs dead
    assert np.isfinite(new).all() and not np.asarray(new).any() and np.mean(np.asarray(keep)) == 0.5


def test_calibration_under_a_mesh_gives_the_one_device_statistics(tiny):
    from research.parallel import sharding

    graphdef, params, _ = tiny
    inputs = np.random.default_rng(0).integers(0, 64, (8, 16)).astype(np.int32)
    paths = core.select(params, core.BLOCK_KERNELS)

    def stats(mesh):
        seen = {}

        def visit(i, total, n, kernels):
            seen.update({(i, k): np.asarray(v) for k, v in total.items()})
            return {k: v * 0.5 for k, v in kernels.items()}  # rewritten blocks feed the next one

        c = calib.Calibration(graphdef, inputs, 4, mesh)
        walked = calib.walk(c, params, paths, visit)
        return seen, tree.flatten(walked), tree.flatten(calib.gradients(c, params))

    one, many = stats(None), stats(sharding.make_mesh(4, 1))
    assert one[0].keys() == many[0].keys() and len(one[0]) > 2
    for a, b in zip(one, many):
        scale = max(float(np.abs(v).max()) for v in a.values())  # float32 sums in another order: rounding
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5 * scale, err_msg=str(k))
    with pytest.raises(errors.UserError, match="not divisible"):
        calib.Calibration(graphdef, inputs, 3, sharding.make_mesh(4, 1))
