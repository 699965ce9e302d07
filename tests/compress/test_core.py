"""The Transform core: select, chain, straight-through, keep_masked (exact zeros through AdamW)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from research import errors, models
from research.compress import core
from research.compress.prune import magnitude, masks
from research.models import config as model_config


def tiny_params():
    cfg = model_config.gpt2_style(vocab_size=64, n_layer=2, n_head=2, d_model=16, max_seq_len=16)
    return models.init(cfg)


def test_select_matches_paths_and_lists_available_on_miss():
    _, params = tiny_params()
    assert core.select(params, r"layers/1/mlp/\w+/kernel") == ["layers/1/mlp/down/kernel", "layers/1/mlp/up/kernel"]
    with pytest.raises(errors.UserError, match="selects no parameter; available: embed/embedding"):
        core.select(params, r"layers/\d+/nothing")
    with pytest.raises(errors.UserError, match="not a valid regex"):
        core.select(params, r"layers/(")


def test_magnitude_keeps_the_largest_weights():
    w = jnp.asarray([[0.5, -3.0], [0.1, 2.0], [-1.0, 0.05]])  # (in 3, out 2)
    params = {"a": {"kernel": w}}
    t = magnitude.magnitude(0.5, where="a/kernel")
    state = t.init(params, jax.random.key(0), None)
    np.testing.assert_array_equal(state["masks"]["a"]["kernel"], [[False, True], [False, True], [True, False]])
    np.testing.assert_array_equal(t.apply(params, state)["a"]["kernel"], [[0, -3.0], [0, 2.0], [-1.0, 0]])


def test_global_ranking_crosses_layers():
    params = {"small": {"kernel": jnp.full((2, 2), 0.1)}, "big": {"kernel": jnp.asarray([[1.0, 2.0], [3.0, 0.2]])}}
    state = magnitude.magnitude(0.5, where=r"\w+/kernel", distribution="global").init(params, jax.random.key(0), None)
    assert not np.asarray(state["masks"]["small"]["kernel"]).any()  # all four small weights go
    np.testing.assert_array_equal(state["masks"]["big"]["kernel"], [[True, True], [True, True]])
    uniform = magnitude.magnitude(0.5, where=r"\w+/kernel").init(params, jax.random.key(0), None)
    assert int(np.sum(uniform["masks"]["small"]["kernel"])) == 2


def test_counts_follow_torch_rounding():
    params = {"a": {"kernel": jnp.arange(1.0, 11.0).reshape(5, 2)}}
    for amount, pruned in ((0.2, 2), (0.25, 2), (0.35, 4), (0.0, 0)):  # round(amount * 10), half to even
        state = magnitude.magnitude(amount, where="a/kernel").init(params, jax.random.key(0), None)
        assert int(np.sum(~np.asarray(state["masks"]["a"]["kernel"]))) == pruned


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_keeps_exactly_n_of_every_m_inputs(pattern):
    n, m = masks.parse_pattern(pattern)
    w = jax.random.normal(jax.random.key(1), (32, 6))
    mask = np.asarray(masks.nm_mask(jnp.abs(w), n, m))
    groups = mask.reshape(32 // m, m, 6)  # groups of m consecutive inputs, per output column
    assert (groups.sum(axis=1) == n).all()
    kept = np.where(mask, np.abs(np.asarray(w)), np.inf).reshape(32 // m, m, 6).min(axis=1)
    dropped = np.where(~mask, np.abs(np.asarray(w)), -np.inf).reshape(32 // m, m, 6).max(axis=1)
    assert (kept >= dropped).all()


def test_erk_densities_hit_the_budget_and_favour_small_layers():
    shapes = {"a": (16, 16), "b": (64, 256), "c": (256, 64)}
    d = masks.erk_densities(shapes, 0.3)
    total = sum(np.prod(s) for s in shapes.values())
    assert sum(d[p] * np.prod(s) for p, s in shapes.items()) == pytest.approx(0.3 * total)
    assert d["a"] > d["b"] == pytest.approx(d["c"])
    capped = masks.erk_densities({"a": (2, 2), "b": (64, 64)}, 0.5)  # the 2x2 layer would exceed 1: stays dense
    assert capped["a"] == 1.0 and capped["b"] == pytest.approx((0.5 * 4100 - 4) / 4096)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sparsity=1.0), r"in \[0, 1\)"),
        (dict(sparsity=-0.1), r"in \[0, 1\)"),
        (dict(pattern="4:2"), "1 <= N <= M"),
        (dict(pattern="2-4"), "look like '2:4'"),
    ],
)
def test_bad_arguments_are_user_errors(kwargs, match):
    with pytest.raises(errors.UserError, match=match):
        magnitude.magnitude(**kwargs)


def test_pattern_must_divide_the_input_dimension():
    params = {"a": {"kernel": jnp.ones((6, 4))}}
    with pytest.raises(errors.UserError, match="do not divide the input dimension 6 of a/kernel"):
        magnitude.magnitude(pattern="2:4", where="a/kernel").init(params, jax.random.key(0), None)


def test_chain_applies_in_order_and_ands_masks():
    params = {"a": {"kernel": jnp.arange(1.0, 9.0).reshape(4, 2)}}
    t = core.chain(magnitude.magnitude(0.25, where="a/kernel"), magnitude.magnitude(0.5, where="a/kernel"))
    state = t.init(params, jax.random.key(0), None)
    effective = np.asarray(t.apply(params, state)["a"]["kernel"])
    np.testing.assert_array_equal(effective, [[0, 0], [0, 0], [5, 6], [7, 8]])
    np.testing.assert_array_equal(np.asarray(t.masks(state)["a"]["kernel"]), effective != 0)


def test_straight_through_forward_is_fn_backward_is_identity():
    x = jnp.asarray([0.3, 1.7, -2.2])
    y, grad = jax.value_and_grad(lambda v: jnp.sum(core.straight_through(jnp.round, v) * 2.0))(x)
    assert float(y) == pytest.approx(2.0 * float(jnp.sum(jnp.round(x))))
    np.testing.assert_array_equal(grad, [2.0, 2.0, 2.0])


def test_masked_weights_stay_exactly_zero_through_100_adamw_steps():
    graphdef, params = tiny_params()
    t = magnitude.magnitude(0.6)
    state = t.init(params, jax.random.key(0), None)
    m = t.masks(state)
    tx = core.keep_masked(optax.adamw(1e-2, weight_decay=0.1))
    opt = tx.init(params)
    tokens = jax.random.randint(jax.random.key(1), (4, 17), 0, 64)

    def loss(p):  # deliberately on the raw params: gradients reach the masked weights too
        logits = models.merge(graphdef, p)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @jax.jit
    def step(p, o):
        g = jax.grad(loss)(p)
        u, o = tx.update(g, o, p, masks=m)
        return optax.apply_updates(p, u), o

    p = params
    for _ in range(100):
        p, o = step(p, opt)
        opt = o
    for path, mask in core.touched(m).items():
        w = np.asarray(core.touched(p)[path])
        assert (w[~np.asarray(mask)] == 0.0).all(), path
        assert np.abs(w[np.asarray(mask)]).min() > 0, path  # kept weights still train
    before = np.asarray(params["layers"][0]["mlp"]["up"]["kernel"])
    assert not np.allclose(np.asarray(p["layers"][0]["mlp"]["up"]["kernel"]), before)


def _exported(t, params):
    state = t.init(params, jax.random.key(0), None)
    effective = core.touched(t.apply(params, state))
    return core.export(t, params, state), effective


def test_a_chain_exports_the_composition_of_its_members_records():
    from research import codes
    from research.compress.quant import rtn
    from research.compress.share import codebook

    _, params = tiny_params()
    q = "layers/0/attn/q/kernel"
    # prune -> quantize: the grid (its zero code holds the pruned zeros); quantize -> prune: the grid, pruned.
    for t in (
        core.chain(magnitude.magnitude(0.5), rtn.rtn(4)),
        core.chain(rtn.rtn(4), magnitude.magnitude(0.5)),
        core.chain(codebook.codebook(3, iters=5), magnitude.magnitude(0.5)),
    ):
        exported, effective = _exported(t, params)
        assert set(exported) == set(core.select(params, core.BLOCK_KERNELS))
        assert isinstance(exported[q], codes.Grid | codes.Palette)
        assert all(codes.describes(c, effective[p]) for p, c in exported.items())
        assert (effective[q] == 0).mean() >= 0.5
    # A mask alone is a Masked record (its kept values are the leaf's own floats).
    exported, _ = _exported(magnitude.magnitude(0.5), params)
    assert isinstance(exported[q], codes.Masked) and np.asarray(exported[q].mask).mean() == pytest.approx(0.5)


def test_a_member_that_re_values_a_leaf_without_a_record_drops_the_earlier_one():
    from research.compress.quant import rtn

    _, params = tiny_params()

    def shift(params, state):  # changes every kernel's values and says nothing about them
        return jax.tree.map(lambda x: x + 1.0, params)

    t = core.chain(rtn.rtn(4), core.Transform(lambda p, k, c: (), shift))
    exported, _ = _exported(t, params)
    assert exported == {}  # the grid no longer describes the values: dense floats, searched by the packer


def test_a_chain_member_with_no_state_is_skipped():
    params = {"a": jnp.arange(1.0, 9.0), "b": jnp.arange(-4.0, 4.0)}
    first, second = magnitude.magnitude(0.5, where="a"), magnitude.magnitude(0.5, where="b")
    t = core.chain(first, second)
    state = (first.init(params, jax.random.key(0), None), None)  # as mixed leaves an option no leaf chose
    out = t.apply(params, state)
    np.testing.assert_array_equal(out["a"], [0, 0, 0, 0, 5, 6, 7, 8])
    np.testing.assert_array_equal(out["b"], params["b"])  # the stateless member did nothing
    assert t.update(params, state, params, 1)[1] is None
    assert set(core.touched(t.masks(state))) == {"a"} and set(core.export(t, params, state)) == {"a"}
