import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import models, tree
from research.models import config as mc
from research.models import transformer

GPT2 = mc.gpt2_style(vocab_size=64, n_layer=4, n_head=2, d_model=16, max_seq_len=16)
LLAMA = mc.llama_style(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=16, max_seq_len=16)


def _tokens(b=2, t=12, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, 64)


@pytest.mark.parametrize("cfg", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_forward_shape_and_causality(cfg):
    graphdef, params = models.init(cfg)
    model = models.merge(graphdef, params)
    x = _tokens()
    logits = model(x)
    assert logits.shape == (2, 12, 64) and logits.dtype == jnp.float32
    changed = model(x.at[:, 7:].set((x[:, 7:] + 1) % 64))
    np.testing.assert_array_equal(np.asarray(logits[:, :7]), np.asarray(changed[:, :7]))
    assert not np.allclose(logits[:, 7:], changed[:, 7:])


def test_param_paths_are_readable_and_stable():
    _, params = models.init(GPT2)
    paths = set(tree.flatten(params))
    assert {
        "layers/3/attn/q/kernel",
        "layers/0/mlp/up/kernel",
        "layers/0/mlp/down/bias",
        "embed/embedding",
        "pos_embed/embedding",
        "final_norm/scale",
        "final_norm/bias",
    } <= paths
    assert not any("lm_head" in p or "gate" in p for p in paths)
    _, lp = models.init(LLAMA)
    flat = tree.flatten(lp)
    assert flat["layers/1/attn/q/kernel"].shape == (16, 16)
    assert flat["layers/1/attn/k/kernel"].shape == (16, 8)  # 2 kv heads of width 4
    assert flat["layers/0/mlp/gate/kernel"].shape == (16, LLAMA.ff_dim)
    assert flat["lm_head/kernel"].shape == (16, 64)
    assert "layers/0/attn_norm/bias" not in flat and "pos_embed/embedding" not in flat


def test_same_seed_same_weights():
    a, b, c = (models.init(GPT2, s)[1] for s in (1, 1, 2))
    assert all(jax.tree.leaves(jax.tree.map(lambda x, y: bool((x == y).all()), a, b)))
    assert not np.array_equal(a["layers"][0]["attn"]["q"]["kernel"], c["layers"][0]["attn"]["q"]["kernel"])


def test_norms_match_numpy():
    x = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32) * 3 + 1
    ln = transformer.Norm(8, "layernorm", 1e-5, bias=True)
    rms = transformer.Norm(8, "rmsnorm", 1e-6, bias=False)
    want_ln = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    want_rms = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(ln(jnp.asarray(x)), want_ln, atol=1e-5)
    np.testing.assert_allclose(rms(jnp.asarray(x)), want_rms, atol=1e-5)


def test_rope_by_hand():
    # Head dim 2: RoPE rotates (x1, x2) by angle = position (inv_freq = 1).
    x = jnp.array([1.0, 0.0]).reshape(1, 1, 1, 2)
    out = transformer.apply_rope(x, jnp.array([[np.pi / 2]]).astype(jnp.float32), 10000.0, 2)
    np.testing.assert_allclose(np.asarray(out).ravel(), [0.0, 1.0], atol=1e-6)


def test_rope_scores_depend_only_on_offset():
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32) for _ in range(2))

    def score(pq, pk):
        rq = transformer.apply_rope(q, jnp.array([[pq]]), 100.0, 8)
        rk = transformer.apply_rope(k, jnp.array([[pk]]), 100.0, 8)
        return float(jnp.sum(rq * rk))

    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-5)
    assert score(0, 0) == pytest.approx(float(jnp.sum(q * k)), abs=1e-6)


def test_partial_rotary_leaves_tail_untouched():
    x = jnp.arange(8.0).reshape(1, 1, 1, 8)
    out = transformer.apply_rope(x, jnp.array([[3]]), 10000.0, 4)
    np.testing.assert_array_equal(np.asarray(out)[..., 4:], np.asarray(x)[..., 4:])


def test_dropout_only_with_a_key():
    cfg = GPT2.replace(dropout=0.5)
    model = models.merge(*models.init(cfg))
    x = _tokens()
    np.testing.assert_array_equal(model(x), model(x))
    a = model(x, dropout_rng=jax.random.key(0))
    b = model(x, dropout_rng=jax.random.key(1))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, model(x, dropout_rng=jax.random.key(0)))


def test_bf16_compute_keeps_fp32_params_and_close_logits():
    g32, p = models.init(LLAMA)
    g16, p16 = models.init(LLAMA.replace(dtype="bfloat16"))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(p16))
    x = _tokens()
    full, half = models.merge(g32, p)(x), models.merge(g16, p)(x)
    assert half.dtype == jnp.float32
    np.testing.assert_allclose(half, full, atol=0.05)
    assert not np.array_equal(half, full)


def test_abstract_allocates_nothing_and_matches_init():
    _, abstract = models.abstract(LLAMA)
    _, params = models.init(LLAMA)
    shapes = jax.tree.map(lambda a: (a.shape, a.dtype), abstract)
    assert shapes == jax.tree.map(lambda a: (a.shape, a.dtype), params)
    assert all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(abstract))


def test_attention_paths_agree_and_dropout_hits_probabilities():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 6, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 6, 2, 8)), jnp.float32) for _ in range(2))
    fused = transformer.causal_attention(q, k, v)
    # The explicit path (used with dropout) at a vanishing rate equals the fused kernel, GQA grouping included.
    explicit = transformer.causal_attention(q, k, v, dropout=1e-9, rng=jax.random.key(0))
    np.testing.assert_allclose(explicit, fused, atol=1e-5)
    dropped = transformer.causal_attention(q, k, v, dropout=0.5, rng=jax.random.key(0))
    assert not np.allclose(dropped, fused)
    # Position 0 attends to one key: dropout keeps it (doubling its value vector) or drops it (zero).
    first = np.asarray(dropped[:, 0])  # (B, H, hd)
    value = 2 * np.repeat(np.asarray(v[:, 0]), 2, axis=1)  # (B, H, hd)
    kept = np.all(np.isclose(first, value, atol=1e-5), -1)
    zeroed = np.all(first == 0, -1)
    assert np.all(kept | zeroed) and kept.any() and zeroed.any()
