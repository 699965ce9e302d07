"""Embeddings and heads compressed like any other leaf: row layouts (a grid or codebook per token row, or per group
along a row), GPTQ of an untied head and of a tied embedding from the final hidden states' Hessian."""

import jax
import numpy as np
import pytest

from research import codes, errors, models
from research.compress import calib, core, registry
from research.compress.quant import gptq
from research.compress.quant import grid as grid_lib
from research.models import config as model_config

V, D = 13, 11  # primes: a transposition does not line up by accident


def _table(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(V, D)) * np.geomspace(0.01, 10, V)[:, None]).astype(np.float32)  # a scale per row


@pytest.mark.parametrize("group", [0, 4, 11])
def test_row_grids_fit_each_row_on_its_own(group):
    w = _table()
    g = grid_lib.Grid(4, False, "row-group" if group else "row", group or 128)
    scale, zero = grid_lib.fit(w, g)
    n = -(-D // group) if group else 1
    assert scale.shape == ((n, V) if group else (V,))
    for r in range(V):
        for j in range(n):
            part = w[r, j * group : (j + 1) * group] if group else w[r]
            lo, hi = min(part.min(), 0), max(part.max(), 0)
            np.testing.assert_allclose(scale[j, r] if group else scale[r], (hi - lo) / 15, rtol=1e-6)
    back = np.asarray(grid_lib.dequantize(grid_lib.quantize(w, scale, zero, g), scale, zero, g))
    step = np.broadcast_to(np.asarray(g.layout.expand(scale, w.shape)), w.shape)
    assert (np.abs(back - w) <= step / 2 + 1e-6).all()


def test_row_layout_is_the_column_layout_of_the_transpose():
    w = _table(1)[:, :8]  # palette groups must divide the row
    lay = codes.Layout("row-group", 4)
    rows = lay.to_problems(w)
    assert rows.shape == (V * 2, 4)
    np.testing.assert_array_equal(rows[0], w[0, :4])  # problem 2r + j: group j of row r
    np.testing.assert_array_equal(rows[2 * 5 + 1], w[5, 4:])
    np.testing.assert_array_equal(lay.from_problems(rows, w.shape), w)
    np.testing.assert_array_equal(codes.Layout("row").to_problems(w)[5], w[5])
    assert lay.param_shape((V, D)) == (3, V) and lay.n_problems(w.shape) == V * 2
    with pytest.raises(ValueError, match="2-D"):
        codes.Layout("row").param_shape((2, 3, 4))


@pytest.mark.filterwarnings("error")  # an export the packer cannot reproduce warns
@pytest.mark.parametrize(
    "spec",
    [
        dict(method="rtn", bits=4, granularity="row"),
        dict(method="rtn", bits=3, granularity="row-group", group_size=4, zero="float"),
        dict(method="rtn", bits=8, granularity="row-group", group_size=4, symmetric=True),
        dict(method="qat", bits=3, granularity="row"),
        dict(method="codebook", bits=2, granularity="row"),
    ],
    ids=["rtn-row", "rtn-row-group-float", "rtn-row-group-sym", "qat-row", "codebook-row"],
)
def test_embedding_codes_pack_exactly_in_row_layouts(spec, tmp_path):
    from research.coding import container, pack

    params = {"embed": {"embedding": _table(2)}}
    t = registry.make(spec.pop("method"), where="embed/embedding", **spec)
    state = t.init(params, jax.random.key(0), None)
    exported = codes.to_numpy(core.export(t, params, state))
    effective = jax.tree.map(np.asarray, t.apply(params, state))
    out = effective["embed"]["embedding"]
    groups = -(-D // spec.get("group_size", D))
    for r in range(V):  # every row (group) on its own few values
        assert len(np.unique(out[r])) <= 2 ** spec["bits"] * groups
    assert codes.describes(exported["embed/embedding"], out)
    pack.pack(effective, tmp_path / "m.zlm", meta={}, exported=exported)
    assert container.Reader(tmp_path / "m.zlm").leaves[0]["kind"] in ("grid", "palette")
    _, back = pack.unpack(tmp_path / "m.zlm")
    assert codes.same_bits(back["embed"]["embedding"], out)
    assert pack.codes_of(tmp_path / "m.zlm")["embed/embedding"].layout == exported["embed/embedding"].layout


def test_row_layouts_are_refused_where_they_do_not_fit():
    with pytest.raises(errors.UserError, match="2-D table"):
        registry.make("rtn", where=".*", granularity="row").init(
            {"x": np.zeros((2, 3, 4), np.float32)}, jax.random.key(0), None
        )
    with pytest.raises(errors.UserError, match="must divide the row length"):
        registry.make("codebook", where=".*", granularity="row-group", group_size=4).init(
            {"x": _table()}, jax.random.key(0), None
        )


def _model(tie: bool):
    cfg = model_config.gpt2_style(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=16, tie_embeddings=tie)
    graphdef, params = models.init(cfg)
    tokens = (np.arange(6000) * 7 % 61).astype(np.int32)
    data = calib.Calibration(graphdef, calib.sample(tokens, 16, 16, seed=0), batch_size=8)
    return graphdef, params, data


def test_walk_gives_the_head_the_hessian_of_the_final_hidden_states():
    graphdef, params, data = _model(tie=True)
    got = {}
    calib.walk(data, params, [], lambda *a: {}, head=lambda h, n: got.update(h=np.asarray(h), n=n))
    x = np.asarray(models.merge(graphdef, params).hidden(data.inputs), np.float64).reshape(-1, 32)
    assert got["n"] == data.inputs.size
    np.testing.assert_allclose(got["h"], x.T @ x, rtol=2e-4, atol=1e-3)


def _head_error(w, q, h):
    d = np.asarray(q, np.float64) - np.asarray(w, np.float64)  # (D, V) kernel
    return float(np.einsum("iv,ij,jv->", d, np.asarray(h, np.float64), d))


@pytest.mark.parametrize("tie", [True, False])
def test_gptq_of_the_head_beats_rtn_on_the_heads_objective(tie):
    graphdef, params, data = _model(tie)
    path = "embed/embedding" if tie else "lm_head/kernel"
    gran = "row" if tie else "channel"
    h = {}
    calib.walk(data, params, [], lambda *a: {}, head=lambda x, n: h.update(h=np.asarray(x)))
    out = {}
    for method in ("gptq", "rtn"):
        t = registry.make(method, bits=3, where=path, granularity=gran)
        state = t.init(params, jax.random.key(0), data)
        q = core.touched(t.apply(params, state))[path]
        rows = np.asarray(q) if tie else np.asarray(q).T
        assert all(len(np.unique(r)) <= 8 for r in rows)  # a grid per token
        w = core.touched(params)[path]
        out[method] = _head_error(w.T if tie else w, q.T if tie else q, h["h"])
        assert codes.describes(codes.to_numpy(core.export(t, params, state))[path], q)
    assert out["gptq"] < 0.9 * out["rtn"], out


def test_gptq_refuses_embeddings_it_cannot_quantize():
    _, params, data = _model(tie=False)
    with pytest.raises(errors.UserError, match="only a lookup table"):
        gptq.gptq(4, where="embed/embedding", granularity="row").init(params, jax.random.key(0), data)
    _, params, data = _model(tie=True)
    with pytest.raises(errors.UserError, match="granularity='row'"):
        gptq.gptq(4, where="embed/embedding").init(params, jax.random.key(0), data)
    with pytest.raises(errors.UserError, match="is for the tied embedding"):
        gptq.gptq(4, where="layers/0/mlp/up/kernel", granularity="row").init(params, jax.random.key(0), data)
