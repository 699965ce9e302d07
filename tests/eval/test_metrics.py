import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from research import errors, models
from research.eval import metrics
from research.models import config as mc
from tests import helpers


@given(n=st.integers(2, 300), window=st.integers(1, 40), data=st.data())
@settings(max_examples=200, deadline=None)
def test_every_target_scored_exactly_once(n, window, data):
    stride = data.draw(st.integers(1, window))
    tokens = np.arange(n)
    inputs, targets, mask = metrics.windows(tokens, metrics.Protocol(window, stride))
    scored = targets[mask]
    assert sorted(scored.tolist()) == list(range(1, n))  # targets 1..n-1, once each
    np.testing.assert_array_equal(targets[mask], inputs[mask] + 1)  # each target follows its input
    # Sliding windows: every scored target after the first window sees >= window - stride tokens of context.
    pos = np.broadcast_to(np.arange(window), mask.shape)
    if len(inputs) > 1:
        assert pos[1:][mask[1:]].min() >= window - stride


def test_windows_respect_max_windows():
    inputs, _, mask = metrics.windows(np.arange(100), metrics.Protocol(10, 10), max_windows=3)
    assert inputs.shape == (3, 10) and mask.sum() == 30


def test_protocol_names():
    assert metrics.Protocol(128, 128).describe() == "non-overlapping windows of 128 tokens"
    assert metrics.Protocol(128, 64).describe() == "sliding windows of 128 tokens, stride 64"
    with pytest.raises(errors.UserError):
        metrics.Protocol(8, 9)


def test_uniform_model_scores_log_vocab():
    # All-zero weights give all-zero logits: every token costs ln(V) nats, log2(V) bits per byte-token.
    cfg = mc.gpt2_style(vocab_size=256, n_layer=1, n_head=1, d_model=8, max_seq_len=16)
    graphdef, params = models.init(cfg)
    zeros = jax.tree.map(lambda x: x * 0, params)
    tokens = np.random.default_rng(0).integers(0, 256, 101)
    r = metrics.evaluate(graphdef, zeros, tokens, np.ones(256), metrics.Protocol(16, 8), batch_size=3)
    assert r["tokens"] == r["bytes"] == 100
    assert r["loss"] == pytest.approx(math.log(256), rel=1e-6)
    assert r["perplexity"] == pytest.approx(256, rel=1e-5)
    assert r["bits_per_byte"] == pytest.approx(8.0, rel=1e-6)


def test_bits_per_byte_uses_token_bytes():
    cfg = mc.gpt2_style(vocab_size=4, n_layer=1, n_head=1, d_model=8, max_seq_len=8)
    graphdef, params = models.init(cfg)
    zeros = jax.tree.map(lambda x: x * 0, params)
    tokens = np.array([0, 1, 2, 3, 1])
    token_bytes = np.array([1, 2, 3, 4])
    r = metrics.evaluate(graphdef, zeros, tokens, token_bytes, metrics.Protocol(8, 8))
    assert r["bytes"] == 2 + 3 + 4 + 2
    assert r["bits_per_byte"] == pytest.approx(4 * 2 / 11, rel=1e-6)  # 4 targets x 2 bits over 11 bytes


def test_accuracy_of_a_model_that_learned_the_pattern():
    cfg = mc.gpt2_style(vocab_size=4, n_layer=1, n_head=1, d_model=8, max_seq_len=8)
    graphdef, params = models.init(cfg)
    # Zero weights: argmax picks token 0 everywhere, so accuracy = share of targets equal to 0.
    zeros = jax.tree.map(lambda x: x * 0, params)
    r = metrics.evaluate(graphdef, zeros, np.array([1, 0, 0, 2, 0]), np.ones(4), metrics.Protocol(8, 8))
    assert r["accuracy"] == pytest.approx(3 / 4)


def test_gptq_windows_by_hand():
    inputs, targets, mask = metrics.windows(np.arange(11), metrics.Protocol.gptq(4))
    assert inputs.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]  # 11 // 4 = 2 windows; tokens 8..10 dropped
    assert targets[mask].tolist() == [1, 2, 3, 5, 6, 7]  # the first token of each window is never a target
    assert "GPTQ/SparseGPT" in metrics.Protocol.gptq(4).describe()
    with pytest.raises(errors.UserError, match="at least one full window"):
        metrics.windows(np.arange(3), metrics.Protocol.gptq(4))
    with pytest.raises(errors.UserError, match="disjoint"):
        metrics.Protocol(4, 2, "gptq")


def test_gptq_perplexity_is_exp_of_the_mean_window_loss():
    # Their formula: exp(sum over windows of (mean NLL of the window * W) / (windows * W)).
    cfg = mc.gpt2_style(vocab_size=16, n_layer=1, n_head=1, d_model=8, max_seq_len=8)
    graphdef, params = models.init(cfg, 3)
    tokens = np.random.default_rng(1).integers(0, 16, 30)
    r = metrics.evaluate(graphdef, params, tokens, np.ones(16), metrics.Protocol.gptq(8), batch_size=2)
    model = models.merge(graphdef, params)
    window_means = []
    for i in range(3):
        seq = tokens[i * 8 : (i + 1) * 8]
        logp = jax.nn.log_softmax(model(seq[None])[0, :-1])
        window_means.append(-float(np.mean(np.asarray(logp)[np.arange(7), seq[1:]])))
    assert r["tokens"] == 21
    assert r["perplexity"] == pytest.approx(math.exp(sum(m * 8 for m in window_means) / (3 * 8)), rel=1e-5)


@helpers.needs_shared
def test_wikitext2_test_with_the_gpt2_tokenizer_has_the_published_token_count():
    # 287,644 tokens is the length the Hugging Face perplexity guide reports for "\n\n".join(test["text"]) with
    # the GPT-2 tokenizer: a check on both the row recovery from wiki.test.raw and the tokenizer.
    from research.data import corpora, tokenizers

    text = corpora.load(f"wikitext:{helpers.WIKITEXT_RAW}").text
    tokens = tokenizers.load(str(helpers.GPT2_TOKENIZER)).encode(text)
    assert len(tokens) == 287_644
    inputs, _, mask = metrics.windows(tokens, metrics.Protocol.gptq(1024))
    assert inputs.shape == (280, 1024) and mask.sum() == 280 * 1023


def _reference(graphdef, params, tokens, protocol):
    """(loss, accuracy) from the full (N, W, V) logits of every window at once: the unchunked formula."""
    inputs, targets, mask = metrics.windows(tokens, protocol)
    logits = models.merge(graphdef, params)(jax.numpy.asarray(inputs))  # (N, W, V)
    logp = np.asarray(jax.nn.log_softmax(logits), np.float64)
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    correct = np.asarray(logits).argmax(-1) == targets
    return nll[mask].mean(), correct[mask].mean()


@pytest.mark.parametrize(
    "cfg",
    [
        mc.gpt2_style(vocab_size=64, n_layer=2, n_head=2, d_model=16, max_seq_len=16),
        mc.llama_style(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=16, max_seq_len=16),
    ],
    ids=["gpt2", "llama"],
)
@pytest.mark.parametrize(("logits_chunk", "attn_chunk"), [(None, None), (16, 16), (4, 4), (5, 3), (1, None)])
def test_chunked_evaluation_equals_the_full_logits(cfg, logits_chunk, attn_chunk):
    # Window 16: chunks 4 divide it, 5 and 3 do not; (16, 16) is the unchunked path.
    graphdef, params = models.init(cfg, 2)
    params = jax.tree.map(lambda x: x * 4, params)  # a peaked model, so that some argmaxes hit their targets
    tokens = np.random.default_rng(0).integers(0, 64, 70)
    inputs, _, _ = metrics.windows(tokens, metrics.Protocol(16, 16))
    logits = models.merge(graphdef, params)(jax.numpy.asarray(inputs))
    tokens = np.asarray(logits).argmax(-1).ravel()[:70]  # text the model partly predicts: accuracy above zero
    protocol = metrics.Protocol(16, 16)
    r = metrics.evaluate(
        graphdef, params, tokens, np.ones(64), protocol, batch_size=3, logits_chunk=logits_chunk, attn_chunk=attn_chunk
    )
    loss, accuracy = _reference(graphdef, params, tokens, protocol)
    assert r["loss"] == pytest.approx(loss, rel=1e-5)
    assert r["accuracy"] == pytest.approx(accuracy, rel=1e-5) and r["accuracy"] > 0


def test_chunk_sizes_must_be_positive():
    cfg = mc.gpt2_style(vocab_size=8, n_layer=1, n_head=1, d_model=8, max_seq_len=8)
    graphdef, params = models.init(cfg)
    for kw in ({"logits_chunk": 0}, {"attn_chunk": -1}):
        with pytest.raises(errors.UserError, match="chunk must be positive"):
            metrics.evaluate(graphdef, params, np.arange(8), np.ones(8), metrics.Protocol(8, 8), **kw)


def test_reference_kl_and_top1_against_full_logits():
    import jax.numpy as jnp

    cfg = mc.llama_style(vocab_size=97, n_layer=1, n_head=2, d_model=16, max_seq_len=32, tie_embeddings=True)
    graphdef, ref = models.init(cfg, 0)
    noisy = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(1), a.shape), ref)
    tokens = np.random.default_rng(0).integers(0, 97, 200)
    protocol = metrics.Protocol(32, 32)
    bytes_ = np.ones(97, np.int64)
    got = metrics.evaluate(
        graphdef, noisy, tokens, bytes_, protocol, batch_size=3, logits_chunk=5, reference=(graphdef, ref)
    )
    same = metrics.evaluate(graphdef, ref, tokens, bytes_, protocol, batch_size=4, reference=(graphdef, ref))
    inputs, _, mask = metrics.windows(tokens, protocol)
    lp = jax.nn.log_softmax(models.merge(graphdef, noisy)(jnp.asarray(inputs)), -1)
    lq = jax.nn.log_softmax(models.merge(graphdef, ref)(jnp.asarray(inputs)), -1)
    kl = np.asarray(jnp.sum(jnp.exp(lq) * (lq - lp), -1))[mask]
    top = np.asarray(jnp.argmax(lp, -1) == jnp.argmax(lq, -1))[mask]
    assert got["tokens"] == mask.sum() and got["kl"] == pytest.approx(kl.mean(), rel=1e-4)
    assert got["top1_agreement"] == pytest.approx(top.mean()) and 0 < got["top1_agreement"] < 1
    assert same["kl"] < 1e-6 and same["top1_agreement"] == 1.0
    plain = metrics.evaluate(graphdef, noisy, tokens, bytes_, protocol, batch_size=3, logits_chunk=5)
    assert got["loss"] == pytest.approx(plain["loss"], rel=1e-6) and got["accuracy"] == plain["accuracy"]


def test_attention_is_chunked_only_when_the_scores_are_large():
    assert metrics.auto_attn_chunk(4, 9, 2048) == metrics.ATTN_CHUNK  # SmolLM2 at window 2048: 604 MB of scores
    assert metrics.auto_attn_chunk(1, 9, 2048) == metrics.ATTN_CHUNK
    assert metrics.auto_attn_chunk(32, 4, 256) == 256  # a small model's eval batch: 33 MB, one chunk


def test_windows_split_over_devices_score_as_on_one_device():
    from research.parallel import sharding

    cfg = mc.llama_style(vocab_size=97, n_layer=1, n_head=2, d_model=16, max_seq_len=32, tie_embeddings=True)
    graphdef, ref = models.init(cfg, 0)
    noisy = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(1), a.shape), ref)
    tokens = np.random.default_rng(0).integers(0, 97, 700)  # 22 windows: the last batch is padded
    protocol, bytes_ = metrics.Protocol(32, 32), np.ones(97, np.int64)
    one = metrics.evaluate(graphdef, noisy, tokens, bytes_, protocol, batch_size=4, reference=(graphdef, ref))
    mesh = sharding.make_mesh(8, 1)
    many = metrics.evaluate(
        graphdef, noisy, tokens, bytes_, protocol, batch_size=3, reference=(graphdef, ref),
        sharding=sharding.batch_sharding(mesh, ("data",)),
    )  # fmt: skip
    assert many["tokens"] == one["tokens"] == 699 and many["accuracy"] == one["accuracy"]
    for k in ("loss", "kl", "top1_agreement"):
        assert many[k] == pytest.approx(one[k], rel=1e-6), k
    # Parameters already laid out on the mesh (a sharded training state) are used where they are.
    placed = jax.device_put(noisy, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    again = metrics.evaluate(
        graphdef, placed, tokens, bytes_, protocol, batch_size=8, sharding=sharding.batch_sharding(mesh, ("data",))
    )
    assert again["loss"] == pytest.approx(one["loss"], rel=1e-6)


def test_a_batch_never_holds_more_rows_than_windows(monkeypatch):
    """One window with batch_size 8 runs one row, not eight (seven of them padding: 7.8x the work at 1B scale)."""
    cfg = mc.gpt2_style(vocab_size=64, n_layer=1, n_head=2, d_model=16, max_seq_len=16)
    g, p = models.init(cfg, 0)
    tokens = np.arange(17) % 64
    rows = []
    real = metrics._eval_step

    class Spy:
        def lower(self, graphdef, params, inputs, *rest):
            rows.append(inputs.shape[0])
            return real.lower(graphdef, params, inputs, *rest)

    monkeypatch.setattr(metrics, "_eval_step", Spy())
    one = metrics.evaluate(g, p, tokens, np.ones(64), metrics.Protocol.gptq(16), batch_size=8)
    three = metrics.evaluate(g, p, np.arange(49) % 64, np.ones(64), metrics.Protocol.gptq(16), batch_size=2)
    assert rows == [1, 2] and one["tokens"] == 15 and three["tokens"] == 45


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_blockwise_evaluation_equals_the_whole_model_step(style):
    """A block at a time gives the whole-model step's sums; bf16 master weights (NumPy host arrays) give those of
    their exact float32 values."""
    make = mc.gpt2_style if style == "gpt2" else mc.llama_style
    extra = {} if style == "gpt2" else dict(n_kv_head=1)
    cfg = make(vocab_size=97, n_layer=3, n_head=2, d_model=32, max_seq_len=32, **extra)
    g, p = models.init(cfg, 0)
    tokens = np.random.default_rng(0).integers(0, 97, 200)
    proto = metrics.Protocol(32, 16)
    whole = metrics.evaluate(g, p, tokens, np.ones(97), proto, batch_size=4, attn_chunk=8, logits_chunk=8)
    blocks = metrics.evaluate(g, p, tokens, np.ones(97), proto, batch_size=4, attn_chunk=8, logits_chunk=8,
                              blockwise=True)  # fmt: skip
    assert blocks["tokens"] == whole["tokens"] and blocks["loss"] == pytest.approx(whole["loss"], abs=1e-6)
    import ml_dtypes

    half = jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16), p)  # host arrays, bf16
    exact = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), half)
    want = metrics.evaluate(g, exact, tokens, np.ones(97), proto, batch_size=4)
    got = metrics.evaluate(g, half, tokens, np.ones(97), proto, batch_size=4, blockwise=True)
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-6) and got["accuracy"] == want["accuracy"]
    with pytest.raises(errors.UserError, match="one device and without a reference"):
        metrics.evaluate(g, p, tokens, np.ones(97), proto, blockwise=True, reference=(g, p))
