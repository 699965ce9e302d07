"""Vector quantization: vector k-means hand-checked, the vectors' layout on rectangular kernels, residual stages,
pruned zeros, entry gradients by hand, fine-tuning, packing bit-exactly as kind "vectors", refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from research import codes, errors, models
from research.coding import container, pack
from research.compress import core, registry
from research.compress.prune import magnitude
from research.compress.share import vkmeans, vq
from research.models import config
from research.train import step as train_step


def _kernel(w, name="up"):
    return {"layers": {0: {"mlp": {name: {"kernel": w, "bias": jnp.zeros(w.shape[-1])}}}}}


def _leaf(tree, name="up"):
    return tree["layers"][0]["mlp"][name]["kernel"]


def _vectors(x, lay, dim):
    """{tuple(vector)} of each problem of a leaf (NumPy)."""
    return [{tuple(v) for v in p} for p in np.asarray(codes.to_vectors(np.asarray(x), lay, dim))]


@pytest.mark.parametrize("init", vkmeans.INITS)
def test_two_separated_clusters_are_found_exactly(init):
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.0, 0.1, (50, 3)), rng.normal(10.0, 0.1, (30, 3))
    order = rng.permutation(80)
    x = np.concatenate([a, b]).astype(np.float32)[order]
    cb, idx, inertia = vkmeans.fit(x[None], 2, init=init, key=jax.random.key(1))
    first = int(np.argmin(np.asarray(cb[0, :, 0])))
    np.testing.assert_allclose(cb[0, first], a.astype(np.float32).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cb[0, 1 - first], b.astype(np.float32).mean(0), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(idx[0]) == first, order < 50)
    want = sum(((m - m.mean(0)) ** 2).sum() for m in (a.astype(np.float32), b.astype(np.float32)))
    assert float(inertia[0]) == pytest.approx(want, rel=1e-4)


def test_indices_are_nearest_and_weights_per_coordinate():
    x = jax.random.normal(jax.random.key(0), (3, 200, 4))
    cb, idx, inertia = vkmeans.fit(x, 16, key=jax.random.key(2))
    d2 = ((np.asarray(x)[:, :, None] - np.asarray(cb)[:, None]) ** 2).sum(-1)  # (P, n, k)
    np.testing.assert_array_equal(np.asarray(idx), d2.argmin(-1))
    np.testing.assert_allclose(inertia, d2.min(-1).sum(1), rtol=1e-5)
    # A zero weight leaves a coordinate out: the centroid's second coordinate is the mean of the weighted ones only;
    # a vector with no weight at all takes part in nothing and gets index 0.
    pts = jnp.array([[[1.0, 1.0], [1.0, 100.0], [1.0, 3.0], [50.0, 50.0]]])
    w = jnp.array([[[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]]])
    cb, idx, inertia = vkmeans.fit(pts, 2, weights=w)
    np.testing.assert_allclose(cb[0, idx[0, 0]], [1.0, 2.0])
    assert int(idx[0, 0]) == int(idx[0, 1]) == int(idx[0, 2]) != int(idx[0, 3])
    assert float(inertia[0]) == pytest.approx(2.0)
    cb, idx, _ = vkmeans.fit(pts, 2, weights=w.at[0, 3].set(0.0))
    assert int(idx[0, 3]) == 0 and not np.any(np.asarray(cb) == 50.0)


def test_empty_cluster_moves_to_the_farthest_vector():
    x = jnp.array([[[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.2, 5.0]]])
    w = jnp.ones_like(x)
    c = jnp.array([[[0.0, 0.0], [5.0, 5.0], [100.0, 100.0]]])  # the last owns nothing
    new = vkmeans._update(x, w, c, *vkmeans.assign(c, x, w))
    np.testing.assert_allclose(new[0], [[0.05, 0.0], [5.1, 5.0], [5.2, 5.0]], rtol=1e-6)


def test_vectors_are_consecutive_inputs_of_one_column():
    w = jax.random.normal(jax.random.key(0), (12, 7))  # 3 vectors of 4 per column: k = 4 holds each exactly
    t = vq.vq(2, dim=4, where=".*kernel", granularity="channel", entry_dtype="float32")
    params = _kernel(w)
    state = t.init(params, jax.random.key(0), None)
    table, idx = _leaf(state["codebook"]), _leaf(state["indices"])
    assert table.shape == (1, 7, 4, 4) and idx.shape == (1, 3, 7) and idx.dtype == jnp.uint8
    assert state["codebook"]["layers"][0]["mlp"]["up"]["bias"] is None
    for o in range(7):
        for j in range(3):
            np.testing.assert_array_equal(table[0, o, idx[0, j, o]], w[4 * j : 4 * j + 4, o])
    np.testing.assert_array_equal(_leaf(t.apply(params, state)), w)
    # rows of a table (V, D): vectors along each row, one codebook per row
    e = jax.random.normal(jax.random.key(1), (5, 12))
    r = vq.vq(2, dim=4, where="embed", granularity="row", entry_dtype="float32")
    s = r.init({"embed": e}, jax.random.key(0), None)
    assert s["codebook"]["embed"].shape == (1, 5, 4, 4) and s["indices"]["embed"].shape == (1, 5, 3)
    np.testing.assert_array_equal(s["codebook"]["embed"][0, 2, s["indices"]["embed"][0, 2, 1]], e[2, 4:8])


@pytest.mark.parametrize(("granularity", "problems"), [("tensor", 1), ("channel", 8)])
def test_at_most_k_distinct_vectors_per_problem(granularity, problems):
    w = jax.random.normal(jax.random.key(3), (64, 8))
    t = vq.vq(3, dim=2, where=".*kernel", granularity=granularity)
    params = _kernel(w)
    state = t.init(params, jax.random.key(0), None)
    eff = np.asarray(_leaf(t.apply(params, state)))
    lay = codes.Layout(granularity)
    found = _vectors(eff, lay, 2)
    assert len(found) == problems and all(len(p) <= 8 for p in found)
    table = np.asarray(vq.stored_entries(_leaf(state["codebook"]), "float16"))  # as the forward pass uses them
    assert all(p <= {tuple(v) for v in table[0, i]} for i, p in enumerate(found))
    np.testing.assert_array_equal(eff, eff.astype(np.float16).astype(np.float32))  # float16 entries by default
    again = t.init(params, jax.random.key(0), None)
    np.testing.assert_array_equal(_leaf(again["indices"]), _leaf(state["indices"]))  # deterministic from the key


def test_residual_stages_lower_the_error_monotonically():
    w = jax.random.normal(jax.random.key(4), (64, 16))
    params = _kernel(w)
    t = vq.vq(3, dim=4, where=".*kernel", stages=3)
    state = t.init(params, jax.random.key(0), None)
    assert _leaf(state["codebook"]).shape == (3, 1, 8, 4)
    # the stages are greedy: the first s of them are the s-stage fit, so one fit gives every stage's error
    x = codes.to_vectors(w, codes.Layout("tensor"), 4)
    opts = dict(k=8, stages=3, entry_dtype="float16", init="kmeans++", iters=100)
    books, _, per_stage = vq.fit_stages(x, jnp.ones_like(x), jax.random.fold_in(jax.random.key(0), 0), **opts)
    np.testing.assert_array_equal(books, _leaf(state["codebook"]))
    errs = np.asarray(per_stage[:, 0])
    assert float(jnp.sum(x**2)) > errs[0] > errs[1] > errs[2]
    assert errs[2] == pytest.approx(float(jnp.sum((_leaf(t.apply(params, state)) - w) ** 2)), rel=1e-4)


def test_entry_gradient_is_the_sum_over_its_vectors_by_hand():
    # (in 4, out 2), dim 2, one codebook: vectors v[j, o] = w[2j:2j+2, o]; w[1, 1] is pruned.
    w = jnp.array([[1.0, -1.0], [1.0, 0.0], [1.2, -1.0], [0.8, -1.2]])
    params = _kernel(w)
    t = vq.vq(1, dim=2, where=".*kernel", lr=0.5, entry_dtype="float32")
    state = t.init(params, jax.random.key(0), None)
    table, idx = _leaf(state["codebook"])[0, 0], np.asarray(_leaf(state["indices"])[0])  # (2, 2), (2, 2)
    a = int(idx[0, 0])  # the entry of column 0's vectors (1, 1) and (1.2, .8)
    np.testing.assert_array_equal(idx, [[a, 1 - a], [a, 1 - a]])
    np.testing.assert_allclose(table[a], [1.1, 0.9], rtol=1e-6)
    np.testing.assert_allclose(table[1 - a], [-1.0, -1.2], rtol=1e-6)  # the pruned coordinate takes no part
    target = jnp.arange(8.0).reshape(4, 2)

    def loss(p, s):
        return jnp.sum(target * _leaf(t.apply(p, s)))

    grads, sgrads = jax.grad(loss, argnums=(0, 1), allow_int=True)(params, state)
    np.testing.assert_allclose(_leaf(grads), target * (w != 0))  # dL/d(effective), 0 where pruned
    g = _leaf(sgrads["codebook"])[0, 0]
    np.testing.assert_allclose(g[a], [0 + 4, 2 + 6])  # column 0: rows (0, 1) and (2, 3)
    np.testing.assert_allclose(g[1 - a], [1 + 5, 7])  # column 1: rows (0, 1) and (2, 3), row 1 pruned
    new = t.learn(state, sgrads, 1)
    np.testing.assert_allclose(_leaf(new["codebook"])[0, 0], table - 0.5 * g)
    assert _leaf(t.apply(params, new))[1, 1] == 0.0
    static = vq.vq(1, dim=2, where=".*kernel", trained=False)
    assert static.learn is None


def test_stage_gradients_aggregate_like_a_scatter_add():
    w = jax.random.normal(jax.random.key(5), (16, 4))
    params = _kernel(w)
    t = vq.vq(2, dim=4, where=".*kernel", stages=2, entry_dtype="bfloat16")
    state = t.init(params, jax.random.key(0), None)
    target = jax.random.normal(jax.random.key(6), w.shape)
    sgrads = jax.grad(lambda s: jnp.sum(target * _leaf(t.apply(params, s))), allow_int=True)(state)
    g = np.asarray(_leaf(sgrads["codebook"]))  # (2, 1, 4, 4)
    vec_grads = np.asarray(codes.to_vectors(target, codes.Layout("tensor"), 4))[0]  # (4, 4): one row per vector
    idx = np.asarray(_leaf(state["indices"])).reshape(2, -1)  # tensor order of the grid (in / d, out)
    for s in range(2):
        want = np.zeros((4, 4))
        np.add.at(want, idx[s], vec_grads)
        np.testing.assert_allclose(g[s, 0], want, rtol=1e-6, atol=1e-6)


def test_prune_then_vq_finetune_keeps_zeros_and_indices():
    cfg = config.gpt2_style(vocab_size=64, n_layer=1, n_head=2, d_model=32, max_seq_len=16)
    graphdef, params = models.init(cfg)
    where = r"layers/\d+/mlp/\w+/kernel"
    t = core.chain(magnitude.magnitude(0.5, where=where), vq.vq(4, dim=4, where=where, lr=1e-2, iters=20))
    tx = core.keep_masked(optax.adamw(1e-3))
    cs = t.init(params, jax.random.key(0), None)
    masks = core.touched(t.masks(cs))
    share0 = jax.tree.map(np.asarray, cs[1])  # the step donates its input state
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params), "compress": cs}
    step = train_step.make_train_step(graphdef, tx, seed=0, dropout=False, transform=t)
    for i in range(10):
        tokens = jax.random.randint(jax.random.key(i), (2, 4, 16), 0, 64)
        state, _ = step(state, {"inputs": tokens[0], "targets": tokens[1]})
    share1 = state["compress"][1]
    eff = core.touched(t.apply(state["params"], state["compress"]))
    for path, mask in masks.items():
        assert bool(jnp.all(eff[path][~mask] == 0)) and not bool(jnp.all(eff[path][mask] == 0))
        whole = np.asarray(codes.to_vectors(mask, codes.Layout("tensor"), 4)).all(-1)  # vectors with nothing pruned
        assert len({tuple(v) for v in np.asarray(codes.to_vectors(eff[path], codes.Layout("tensor"), 4))[whole]}) <= 16
        np.testing.assert_array_equal(core.touched(share1["indices"])[path], core.touched(share0["indices"])[path])
        assert not np.allclose(core.touched(share1["codebook"])[path], core.touched(share0["codebook"])[path])


@pytest.mark.parametrize(
    ("make", "granularity"),
    [
        (lambda: vq.vq(8, dim=4, where="a"), "tensor"),
        (lambda: vq.vq(3, dim=2, where="a", granularity="channel", stages=2, entry_dtype="float32"), "channel"),
        (lambda: core.chain(magnitude.magnitude(0.6, where="a"), vq.vq(5, dim=4, where="a")), "tensor"),
        (lambda: vq.vq(9, dim=8, where="a", iters=5, entry_dtype="bfloat16"), "tensor"),
        (lambda: vq.vq(2, dim=4, where="e", granularity="row", trained=False), "row"),
    ],
    ids=["tensor-8bit-d4", "channel-2stage", "pruned", "uint16-indices", "row"],
)
def test_pack_unpack_is_bit_exact(tmp_path, make, granularity):
    params = {
        "a": jax.random.normal(jax.random.key(7), (256, 128)) * 0.05,
        "e": jax.random.normal(jax.random.key(8), (32, 16)),
    }
    t = make()
    state = t.init(params, jax.random.key(0), None)
    effective = jax.tree.map(np.asarray, t.apply(params, state))
    exported = core.export(t, params, state)
    out = tmp_path / "m.zlm"
    rep = pack.pack(effective, out, meta={}, exported=exported)
    _, back = pack.unpack(out)
    for k in params:
        assert codes.same_bits(back[k], effective[k]), k
    path = next(iter(exported))
    leaf = {x["path"]: x for x in container.Reader(out).leaves}[path]
    assert leaf["kind"] == "vectors" and leaf["layout"] == granularity
    got, sent = pack.codes_of(out)[path], exported[path]
    assert isinstance(got, codes.Vectors) and got.indices.dtype == np.asarray(sent.indices).dtype
    assert codes.same_bits(got.table, np.asarray(sent.table, np.float32))
    kept = np.ones(got.indices.shape[1:], bool) if got.keep is None else pack._live_vectors(got.keep, got.layout, 4)
    np.testing.assert_array_equal(got.indices[:, kept], np.asarray(sent.indices)[:, kept])
    if granularity == "tensor" and path == "a" and got.stages == 1 and got.keep is None:
        bits, dim = int(np.log2(got.table.shape[2])), got.dim
        table_bits = got.table.size * 16 / params["a"].size
        bpw = 8 * sum(leaf["sections"][s]["length"] for s in leaf["sections"]) / params["a"].size
        assert bits / dim * 0.95 < bpw < bits / dim + table_bits + 0.01
    assert rep["kinds"]["vectors"]["leaves"] == 1


def test_bad_arguments_are_user_errors():
    for kwargs in [
        dict(bits=0),
        dict(bits=13),
        dict(bits=2.5),
        dict(dim=0),
        dict(dim=9),
        dict(stages=0),
        dict(granularity="group"),
        dict(init="linear"),
        dict(entry_dtype="int8"),
        dict(weighting="hessian"),
        dict(iters=-1),
    ]:
        with pytest.raises(errors.UserError):
            vq.vq(**kwargs)
    with pytest.raises(errors.UserError, match=r"layers/0/mlp/up/kernel \(10, 4\).*divides 10"):
        vq.vq(2, dim=4).init(_kernel(jnp.ones((10, 4))), jax.random.key(0), None)
    with pytest.raises(errors.UserError, match="2-D table"):
        vq.vq(2, dim=2, where=".*kernel", granularity="row").init(_kernel(jnp.ones((4, 4, 2))), jax.random.key(0), None)
    with pytest.raises(errors.UserError, match="NaN"):
        vq.vq(2, dim=2).init(_kernel(jnp.full((4, 4), jnp.nan)), jax.random.key(0), None)
    with pytest.raises(errors.UserError, match="needs calibration data"):
        vq.vq(2, dim=2, weighting="fisher").init(_kernel(jnp.ones((4, 4))), jax.random.key(0), None)
    with pytest.raises(errors.UserError, match="unknown compression method"):
        registry.make("vector")
    assert isinstance(registry.make("vq", bits=2, dim=2), core.Transform)
    assert registry.needs_calibration({"method": "vq", "weighting": "fisher"})
    assert not registry.needs_calibration({"method": "vq"})


def test_fisher_weighted_vq_follows_the_sensitive_weights():
    from research.compress import calib

    cfg = config.gpt2_style(vocab_size=64, n_layer=1, n_head=2, d_model=32, max_seq_len=16)
    graphdef, params = models.init(cfg)
    data = calib.Calibration(graphdef, calib.sample(np.arange(3000) % 64, 8, 16, seed=0), batch_size=4)
    where = "layers/0/mlp/up/kernel"
    f = np.asarray(calib.fisher(data, params)["layers"][0]["mlp"]["up"]["kernel"])
    w = np.asarray(_leaf(params))

    def weighted_error(weighting):
        t = vq.vq(4, dim=2, where=where, weighting=weighting, entry_dtype="float32")
        eff = np.asarray(_leaf(t.apply(params, t.init(params, jax.random.key(0), data))))
        return float(np.sum(f * (w - eff) ** 2))

    assert weighted_error("fisher") < weighted_error("none")


def test_exports_refuse_vector_codebooks(tmp_path):
    from research.export import compressed_tensors as ct
    from research.export import gguf as gguf_out
    from tests.models.test_gguf import _tiny

    cfg, params = _tiny(vocab=128, d=64, tie=False)
    t = vq.vq(2, dim=4, where=r"layers/\d+/attn/q/kernel", iters=3, trained=False)
    state = t.init(params, jax.random.key(0), None)
    effective, found = t.apply(params, state), codes.to_numpy(core.export(t, params, state))
    with pytest.raises(errors.UserError, match="q/kernel: it is a vector codebook"):
        ct.export(cfg, effective, tmp_path / "ct", codes=found)
    with pytest.raises(errors.UserError, match="q/kernel: it is a vector codebook.*--requantize"):
        gguf_out.export(cfg, effective, tmp_path / "q.gguf", codes=found, type="q8_0")
    rep = gguf_out.export(cfg, effective, tmp_path / "a.gguf", codes=found)  # auto: the values, exact
    assert any("vector codebook" in x["how"] for x in rep["tensors"])
