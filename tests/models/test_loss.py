import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import models
from research.models import config as mc
from research.models import loss, transformer
from research.train import step

GPT2 = mc.gpt2_style(vocab_size=64, n_layer=2, n_head=2, d_model=16, max_seq_len=32)  # tied head, learned positions
LLAMA = mc.llama_style(
    vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=16, max_seq_len=32, tie_embeddings=False
)  # untied head, GQA, RoPE
CFGS = {"gpt2": GPT2, "llama": LLAMA}
T = 13


def _model(name, dtype):
    import dataclasses

    cfg = dataclasses.replace(CFGS[name], dtype=dtype)
    graphdef, params = models.init(cfg, seed=1)
    params = jax.tree.map(lambda x: x * 4, params)  # sharper distributions: argmax and NLL are not near-uniform
    return models.merge(graphdef, params)


def _batch(seed=0):
    x = jax.random.randint(jax.random.key(seed), (3, T + 1), 0, 64)
    return x[:, :-1], x[:, 1:]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hidden_then_head_is_the_forward(name, dtype):
    model = _model(name, dtype)
    inputs, _ = _batch()
    h = model.hidden(inputs)
    assert h.shape == (3, T, 16) and h.dtype == jnp.dtype(dtype)
    logits = model.head(h)
    assert logits.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(model(inputs)))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("chunk", [1, 4, 5, T, 64])  # 4 and 5 do not divide T = 13
def test_chunked_nll_equals_full_logits(name, dtype, chunk):
    model = _model(name, dtype)
    inputs, targets = _batch()
    logits = model(inputs)  # (B, T, V)
    targets = jnp.where(jnp.arange(T) % 2 == 0, jnp.argmax(logits, -1), targets)  # some targets are the argmax
    want_nll = step.token_nll(logits, targets)
    want_correct = jnp.argmax(logits, -1) == targets
    nll, correct = jax.jit(lambda h, t: loss.chunked_nll(model.head, h, t, chunk))(model.hidden(inputs), targets)
    assert nll.shape == correct.shape == (3, T) and nll.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(nll), np.asarray(want_nll), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(correct), np.asarray(want_correct))
    assert 0 < int(correct.sum()) < correct.size  # the check above is not vacuous


def test_chunked_nll_by_hand():
    # Identity head over one-hot-ish hidden states: logits are the hidden states themselves.
    h = jnp.array([[[2.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]])  # (1, 3, 3)
    targets = jnp.array([[0, 1, 2]])
    nll, correct = loss.chunked_nll(lambda x: x, h, targets, 2)
    lse = np.log(np.exp(np.asarray(h[0])).sum(-1))
    np.testing.assert_allclose(np.asarray(nll[0]), lse - np.array([2.0, 0.0, 1.0]), rtol=1e-6)
    assert correct.tolist() == [[True, False, False]]  # argmax of [1, 1, 1] is 0, not 2
    with pytest.raises(ValueError, match="chunk"):
        loss.chunked_nll(lambda x: x, h, targets, 0)


def test_auto_chunk():
    assert loss.auto_chunk(4, 2048, 49152) == 2**24 // (4 * 49152)  # 85 positions: 64 MiB of float32 logits
    assert loss.auto_chunk(1, 2048, 49152) == 85  # a batch below MIN_BATCH keeps the positions, not the rows
    assert loss.auto_chunk(8, 2048, 49152) == 2**24 // (8 * 49152)
    assert loss.auto_chunk(1, 16, 64) == 16  # everything fits: one chunk
    assert loss.auto_chunk(1024, 2048, 10**6, budget=10) == 1


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("chunk", [1, 3, 4, T, 20])
def test_chunked_attention_equals_attention(window, chunk):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(k1, (2, T, 4, 8))
    k, v = jax.random.normal(k2, (2, T, 2, 8)), jax.random.normal(k3, (2, T, 2, 8))
    want = transformer.causal_attention(q, k, v, window=window)
    got = transformer.chunked_causal_attention(q, k, v, chunk, window)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_attn_chunk_forward_equals_forward(name, dtype):
    model = _model(name, dtype)
    inputs, _ = _batch()
    tol = 1e-5 if dtype == "float32" else 2e-2
    want = np.asarray(model(inputs))
    np.testing.assert_allclose(np.asarray(model(inputs, attn_chunk=4)), want, rtol=tol, atol=tol)
    got = model.head(model.hidden(inputs, attn_chunk=5))
    np.testing.assert_allclose(np.asarray(got), want, rtol=tol, atol=tol)
