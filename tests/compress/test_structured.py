"""Structured pruning: hand-checked magnitude rankings, whole-unit masks, and `shrink` computing what the masked
model computes (GPT-2 with biases, Llama with GQA and RoPE, Qwen2-style q/k/v biases), through a Hugging Face round
trip too."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import errors, models, tree
from research.compress import calib, core
from research.compress.prune import structured
from research.models import config as mc
from research.models import hf
from research.train import step

GPT2 = mc.gpt2_style(vocab_size=32, n_layer=2, n_head=4, d_model=16, d_ff=24, max_seq_len=16)
LLAMA = mc.llama_style(vocab_size=32, n_layer=2, n_head=4, n_kv_head=2, d_model=16, d_ff=24, max_seq_len=16)
QWEN = mc.llama_style(vocab_size=32, n_layer=2, n_head=4, d_model=16, d_ff=24, max_seq_len=16, qkv_bias=True)
CASES = {"gpt2": GPT2, "llama-gqa": LLAMA, "qwen2": QWEN}


@functools.cache
def _random_params(cfg, seed=0):
    """Random weights, every bias and norm scale non-trivial, so that a forgotten bias cannot hide (numpy: fast)."""
    rng = np.random.default_rng(seed)

    def draw(path, a):
        x = rng.normal(size=a.shape).astype(np.float32)
        return jnp.asarray(1.0 + 0.1 * x if path.endswith("scale") else 0.2 * x)

    return tree.map_with_path(draw, models.abstract(cfg)[1])


@functools.cache
def _forward(cfg):
    graphdef, _ = models.abstract(cfg)
    return jax.jit(lambda params, tokens: models.merge(graphdef, params)(tokens))


def _logits(cfg, params, tokens):
    return np.asarray(_forward(cfg)(params, jnp.asarray(tokens)))


def _tokens(cfg, shape=(2, 12)):
    return np.random.default_rng(0).integers(0, cfg.vocab_size, shape)


def _calibration(cfg, n=4, length=9):
    graphdef, _ = models.abstract(cfg)
    inputs = np.random.default_rng(1).integers(0, cfg.vocab_size, (n, length)).astype(np.int32)
    return calib.Calibration(graphdef, inputs, batch_size=2)


def _hand_params(cfg, head_c, neuron_c):
    """All weights zero except each unit's, which are filled with its constant (k negated: signs must not matter)."""
    params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), models.abstract(cfg)[1])
    hd, f = cfg.dim_head, cfg.ff_dim
    for i, (hc, nc) in enumerate(zip(head_c, neuron_c)):
        cols = jnp.repeat(jnp.asarray(hc, jnp.float32), hd)  # (H*hd,)
        a, m = params["layers"][i]["attn"], params["layers"][i]["mlp"]
        for name, sign in (("q", 1.0), ("k", -1.0), ("v", 1.0)):
            a[name]["kernel"] = sign * jnp.broadcast_to(cols, a[name]["kernel"].shape)
            a[name]["bias"] = sign * cols
        a["o"]["kernel"] = jnp.broadcast_to(cols[:, None], a["o"]["kernel"].shape)
        nc = jnp.asarray(nc, jnp.float32)  # (F,)
        m["up"]["kernel"] = jnp.broadcast_to(nc, (cfg.d_model, f))
        m["up"]["bias"] = nc
        m["down"]["kernel"] = jnp.broadcast_to(nc[:, None], (f, cfg.d_model))
    return params


def test_magnitude_removes_the_units_of_smallest_norm():
    cfg = mc.gpt2_style(vocab_size=16, n_layer=2, n_head=4, d_model=8, d_ff=6, max_seq_len=8)
    head_c = [[3, 1, 4, 2], [1, 5, 2, 6]]
    neuron_c = [[1, 6, 2, 5, 3, 4], [6, 5, 4, 3, 2, 1]]
    params = _hand_params(cfg, head_c, neuron_c)
    t = structured.structured(heads=0.5, neurons=0.5, head_dim=cfg.dim_head)
    state = t.init(params, jax.random.key(0), None)
    np.testing.assert_array_equal(state["keep"]["heads"], [[0, 2], [1, 3]])
    np.testing.assert_array_equal(state["keep"]["neurons"], [[1, 3, 5], [0, 1, 2]])
    heads, neurons = structured.scores(params, "magnitude", structured.layout(params, cfg.dim_head))
    per_head = 4 * cfg.d_model * cfg.dim_head + 3 * cfg.dim_head  # weights of one head: q, k, v columns, o rows
    np.testing.assert_allclose(heads, np.sqrt(per_head) * np.asarray(head_c, np.float32), rtol=1e-6)
    np.testing.assert_allclose(neurons, np.sqrt(2 * cfg.d_model + 1) * np.asarray(neuron_c, np.float32), rtol=1e-6)


def test_rounding_follows_torch_prune():
    params = _random_params(GPT2)  # 4 heads, 24 neurons: round(0.3 * 4) = 1, round(0.1 * 24) = 2
    state = structured.structured(0.3, 0.1, head_dim=GPT2.dim_head).init(params, jax.random.key(0), None)
    assert state["keep"]["heads"].shape == (2, 3) and state["keep"]["neurons"].shape == (2, 22)


@pytest.mark.parametrize("name", sorted(CASES))
def test_masks_zero_whole_units_and_the_same_count_per_block(name):
    cfg = CASES[name]
    params = _random_params(cfg)
    t = structured.structured(heads=0.5, neurons=0.25, head_dim=cfg.dim_head)
    state = t.init(params, jax.random.key(0), None)
    lay = structured.layout(params, cfg.dim_head)
    assert lay == (cfg.kv_heads, cfg.n_head // cfg.kv_heads, cfg.dim_head)
    masked = t.apply(params, state)
    assert t.masks(state) is state["masks"]
    paths = set(core.touched(state["masks"]))
    assert all(p.split("/")[-2] in ("q", "k", "v", "o", "up", "gate", "down") for p in paths)
    assert not any(p.endswith(("o/bias", "down/bias")) for p in paths)  # shared biases stay
    for i, (orig, new) in enumerate(zip(structured.blocks(params), structured.blocks(masked))):
        # A unit is either untouched or entirely zero.
        zero_h, _ = structured.unit_sums(jax.tree.map(lambda x: (x != 0).astype(jnp.float32), new), lay)
        full_h, _ = structured.unit_sums(jax.tree.map(lambda x: (x != 0).astype(jnp.float32), orig), lay)
        _, zero_n = structured.unit_sums(jax.tree.map(lambda x: (x != 0).astype(jnp.float32), new), None)
        _, full_n = structured.unit_sums(jax.tree.map(lambda x: (x != 0).astype(jnp.float32), orig), None)
        kept_h = np.flatnonzero(np.asarray(zero_h))
        kept_n = np.flatnonzero(np.asarray(zero_n))
        np.testing.assert_array_equal(kept_h, state["keep"]["heads"][i])
        np.testing.assert_array_equal(kept_n, state["keep"]["neurons"][i])
        np.testing.assert_array_equal(np.asarray(zero_h)[kept_h], np.asarray(full_h)[kept_h])
        np.testing.assert_array_equal(np.asarray(zero_n)[kept_n], np.asarray(full_n)[kept_n])
        assert len(kept_h) == cfg.kv_heads - round(0.5 * cfg.kv_heads)
        assert len(kept_n) == cfg.ff_dim - round(0.25 * cfg.ff_dim)
    # query heads follow their kv head: in the GQA case, heads 2g and 2g+1 go with kv head g
    q = np.asarray(state["masks"]["layers"][0]["attn"]["q"]["kernel"][0]).reshape(lay.n_kv, -1)
    k = np.asarray(state["masks"]["layers"][0]["attn"]["k"]["kernel"][0]).reshape(lay.n_kv, -1)
    assert (q == q[:, :1]).all() and (q[:, 0] == k[:, 0]).all()


def _removed_per_block(cfg, n_units, n_neurons):
    hd, d, r = cfg.dim_head, cfg.d_model, cfg.n_head // cfg.kv_heads
    unit = 2 * d * r * hd + 2 * d * hd + cfg.has_bias("qkv") * (r * hd + 2 * hd)
    neuron = (3 if cfg.gated_mlp else 2) * d + cfg.has_bias("mlp") * (2 if cfg.gated_mlp else 1)
    return n_units * unit + n_neurons * neuron


@pytest.mark.parametrize("name", sorted(CASES))
def test_shrunk_model_computes_what_the_masked_model_computes(name):
    cfg = CASES[name]
    params = _random_params(cfg)
    t = structured.structured(heads=0.5, neurons=0.25, head_dim=cfg.dim_head)
    state = t.init(params, jax.random.key(0), None)
    new_cfg, new_params = structured.shrink(cfg, params, state)
    assert (new_cfg.n_head, new_cfg.kv_heads, new_cfg.dim_head) == (cfg.n_head // 2, cfg.kv_heads // 2, cfg.dim_head)
    assert new_cfg.ff_dim == cfg.ff_dim - 6 and mc.ModelConfig.from_dict(new_cfg.to_dict()) == new_cfg
    abstract = models.abstract(new_cfg)[1]
    assert jax.tree.structure(new_params) == jax.tree.structure(abstract)
    assert jax.tree.map(jnp.shape, new_params) == jax.tree.map(lambda a: a.shape, abstract)
    n_new = sum(x.size for x in jax.tree.leaves(new_params))
    assert n_new == mc.count_params(new_cfg)
    removed = cfg.n_layer * _removed_per_block(cfg, cfg.kv_heads // 2, 6)
    assert mc.count_params(cfg) - n_new == removed
    tokens = _tokens(cfg)
    masked = _logits(cfg, t.apply(params, state), tokens)
    np.testing.assert_allclose(_logits(new_cfg, new_params, tokens), masked, atol=1e-5, rtol=0)
    assert np.abs(masked - _logits(cfg, params, tokens)).max() > 1e-3  # the pruning did change the model


def test_shrink_without_head_pruning_keeps_the_attention():
    params = _random_params(GPT2)
    state = structured.structured(0.0, 0.5).init(params, jax.random.key(0), None)  # no head_dim needed
    assert state["keep"]["heads"] is None
    new_cfg, new_params = structured.shrink(GPT2, params, state)
    assert new_cfg == GPT2.replace(d_ff=12)
    assert new_params["layers"][1]["attn"]["q"]["kernel"] is params["layers"][1]["attn"]["q"]["kernel"]


def test_shrink_refuses_params_of_another_config():
    params = _random_params(GPT2)
    state = structured.structured(0.5, 0.5, head_dim=GPT2.dim_head).init(params, jax.random.key(0), None)
    with pytest.raises(errors.UserError, match="do not match"):
        structured.shrink(GPT2.replace(d_ff=32), params, state)


@pytest.mark.parametrize("name,heads", [("llama-gqa", 0.5), ("gpt2", 0.0)])
def test_shrunk_model_exports_to_hugging_face_and_back(name, heads, tmp_path):
    cfg = CASES[name]
    params = _random_params(cfg)
    t = structured.structured(heads=heads, neurons=0.5, head_dim=cfg.dim_head)
    state = t.init(params, jax.random.key(0), None)
    new_cfg, new_params = structured.shrink(cfg, params, state)
    info = hf.export(new_cfg, new_params, tmp_path / "ckpt")
    assert info["model_type"] == name.split("-")[0]
    pre = hf.load(str(tmp_path / "ckpt"))
    tokens = _tokens(cfg)
    np.testing.assert_allclose(
        _logits(pre.cfg, pre.params, tokens), _logits(cfg, t.apply(params, state), tokens), atol=1e-5, rtol=0
    )


def test_gpt2_without_some_heads_has_no_hugging_face_layout(tmp_path):
    params = _random_params(GPT2)
    state = structured.structured(0.5, 0.0, head_dim=GPT2.dim_head).init(params, jax.random.key(0), None)
    new_cfg, new_params = structured.shrink(GPT2, params, state)
    with pytest.raises(errors.UserError, match="multi-head"):
        hf.export(new_cfg, new_params, tmp_path / "x", model_type="gpt2")


def test_taylor_needs_calibration_and_is_gradient_times_weight():
    params = _random_params(LLAMA)
    t = structured.structured(heads=0.5, neurons=0.5, score="taylor", head_dim=LLAMA.dim_head)
    with pytest.raises(errors.UserError, match="calibration"):
        t.init(params, jax.random.key(0), None)
    cal = _calibration(LLAMA)
    heads, neurons = structured.scores(params, "taylor", structured.layout(params, LLAMA.dim_head), cal)
    assert heads.shape == (2, 2) and neurons.shape == (2, 24)
    assert np.isfinite(heads).all() and np.isfinite(neurons).all() and (neurons > 0).all()
    grad = jax.jit(jax.grad(step.loss_fn), static_argnums=1)
    expected = 0.0
    for window in cal.batches():
        batch = {"inputs": window[:, :-1], "targets": window[:, 1:]}
        g = grad(params, cal.graphdef, batch)["layers"][1]["mlp"]
        w = params["layers"][1]["mlp"]
        expected += abs(
            float(
                jnp.sum(g["up"]["kernel"][:, 3] * w["up"]["kernel"][:, 3])
                + jnp.sum(g["gate"]["kernel"][:, 3] * w["gate"]["kernel"][:, 3])
                + jnp.sum(g["down"]["kernel"][3] * w["down"]["kernel"][3])
            )
        )
    np.testing.assert_allclose(neurons[1, 3], expected, rtol=1e-4)
    state = t.init(params, jax.random.key(0), cal)
    new_cfg, new_params = structured.shrink(LLAMA, params, state)
    tokens = _tokens(LLAMA)
    np.testing.assert_allclose(
        _logits(new_cfg, new_params, tokens), _logits(LLAMA, t.apply(params, state), tokens), atol=1e-5, rtol=0
    )


def test_activation_score_reads_the_head_width_from_calibration():
    params = _random_params(GPT2)
    cal = _calibration(GPT2)
    state = structured.structured(0.25, 0.5, score="activation").init(params, jax.random.key(0), cal)
    assert state["keep"]["heads"].shape == (2, 3) and state["keep"]["neurons"].shape == (2, 12)
    heads, neurons = structured.scores(params, "activation", structured.layout(params, GPT2.dim_head), cal)
    assert np.isfinite(heads).all() and (np.asarray(neurons) > 0).all()
    flat = tree.flatten(state["masks"])
    assert {p.split("/", 2)[2] for p in flat} >= {"attn/q/kernel", "attn/o/kernel", "mlp/up/bias"}


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(heads=1.0),
        dict(heads=-0.1),
        dict(neurons=1.0),
        dict(neurons="0.5"),
        dict(heads=True),
        dict(score="l1"),
    ],
)
def test_bad_arguments_are_user_errors(kwargs):
    with pytest.raises(errors.UserError):
        structured.structured(**kwargs)


def test_removing_every_head_or_a_missing_head_width_is_a_user_error():
    cfg = mc.gpt2_style(vocab_size=16, n_layer=1, n_head=2, d_model=8, max_seq_len=8)
    params = _random_params(cfg)
    with pytest.raises(errors.UserError, match="removes all"):
        structured.structured(heads=0.75, head_dim=4).init(params, jax.random.key(0), None)  # round(1.5) = 2
    with pytest.raises(errors.UserError, match="head_dim"):
        structured.structured(heads=0.5).init(params, jax.random.key(0), None)
    with pytest.raises(errors.UserError, match="does not fit"):
        structured.structured(heads=0.5, head_dim=3).init(params, jax.random.key(0), None)
