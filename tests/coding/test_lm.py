"""Coding data with a model: exact round trips for any bytes, the coded size against the model's log-loss,
damaged files and the wrong model refused."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from research import errors, models, sources
from research.coding import lm
from research.models import config as model_config
from research.train import step as train_step
from tests.helpers import GPT2_TOKENIZER, needs_shared


def _model(tokenizer="byte", vocab=256, seed=0, context=16):
    cfg = model_config.gpt2_style(vocab_size=vocab, n_layer=2, n_head=2, d_model=32, max_seq_len=context)
    graphdef, params = models.init(cfg, seed=seed)
    return sources.Model(cfg, graphdef, params, tokenizer, "run", f"tiny-{seed}")


BYTE = _model()


@given(st.binary(max_size=120), st.integers(1, 16), st.integers(1, 5))
@settings(max_examples=25, deadline=None)
def test_any_bytes_round_trip_at_any_chunking(data, chunk_len, batch_size):
    blob, rep = lm.encode(data, BYTE, chunk_len=chunk_len, batch_size=batch_size)
    out, _ = lm.decode(blob, BYTE)
    assert out == data and rep["input_bytes"] == len(data)


@pytest.mark.parametrize(
    "data",
    [b"", b"a", bytes(range(256)), b"\xff\xfe\x80 not utf-8 \xc3", b"ab" * 400, "naïve 日本語 ✓ 🜲".encode()],
    ids=["empty", "one", "all-bytes", "invalid-utf8", "repeated", "unicode"],
)
def test_edge_cases_round_trip(data):
    blob, _ = lm.encode(data, BYTE, chunk_len=16, batch_size=4)
    assert lm.decode(blob, BYTE)[0] == data


def _reference_bits(m, tokens, batch_size, chunk_len):
    """The model's log-loss of the tokens under the coder's streams and windows, by full forward passes."""
    window = m.cfg.max_seq_len
    keep, span = window - chunk_len + 1, -(-len(tokens) // batch_size)
    model, total = models.merge(m.graphdef, m.params), 0.0
    for i in range(batch_size):
        seg = tokens[i * span : (i + 1) * span]
        for lo in range(0, len(seg), chunk_len):
            ctx = np.array([10]) if lo == 0 else seg[max(0, lo - keep) : lo]
            new = seg[lo : lo + chunk_len]
            x = np.concatenate([ctx, new[:-1]]).astype(np.int32)[None]
            nll = train_step.token_nll(model(jnp.asarray(x))[:, len(ctx) - 1 :], jnp.asarray(new[None]))
            total += float(jnp.sum(nll)) / np.log(2)
    return total


@pytest.mark.parametrize("chunk_len", [16, 8, 5])
def test_coded_size_is_the_log_loss_plus_a_few_bytes(chunk_len):
    data = bytes(np.random.default_rng(0).integers(97, 123, 600, dtype=np.uint8))
    blob, rep = lm.encode(data, BYTE, chunk_len=chunk_len, batch_size=6)
    bits = _reference_bits(BYTE, np.frombuffer(data, np.uint8).astype(np.int32), 6, chunk_len)
    assert rep["ideal_bits"] == pytest.approx(bits, rel=1e-4)
    assert len(blob) <= rep["ideal_bits"] / 8 * 1.001 + 64  # the target: 0.1% + 64 bytes


def test_damaged_files_and_the_wrong_model_fail_cleanly():
    data = b"the quick brown fox jumps over the lazy dog " * 10
    blob, _ = lm.encode(data, BYTE, chunk_len=16, batch_size=4)
    with pytest.raises(errors.UserError, match="coded with another model"):
        lm.decode(blob, _model(seed=1))
    cases = {
        "magic": (lambda b: b"XXXX" + b[4:], "wrong magic"),
        "version": (lambda b: b[:4] + b"\x09" + b[5:], "version 9"),
        "truncated header": (lambda b: b[:20], "too short|truncated"),
        "truncated payload": (lambda b: b[:-3], "truncated or padded"),
        "flipped header bit": (lambda b: b[:30] + bytes([b[30] ^ 4]) + b[31:], "checksum|truncated"),
        "flipped payload bit": (lambda b: b[:-9] + bytes([b[-9] ^ 1]) + b[-8:], "payload fails its checksum"),
    }
    for bad, match in cases.values():
        with pytest.raises(errors.CorruptData, match=match):
            lm.decode(bad(blob), BYTE)


def test_bad_chunking_is_a_user_error():
    with pytest.raises(errors.UserError, match="exceeds the model's context"):
        lm.encode(b"abc", BYTE, chunk_len=17)
    with pytest.raises(errors.UserError, match="batch_size must be a positive integer"):
        lm.encode(b"abc", BYTE, batch_size=0)


@needs_shared
def test_tokenizer_models_code_tokens_and_escape_what_does_not_round_trip():
    m = _model(f"hf:{GPT2_TOKENIZER}", vocab=50257, context=32)
    data = "Hello, world! naïve café 日本 \u200b".encode() + b"\xff\xfe raw" + b" and back to text."
    blob, rep = lm.encode(data, m, chunk_len=32, batch_size=2)
    assert lm.decode(blob, m)[0] == data
    assert rep["tokens"] < len(data) and rep["escape_bytes"] == 2  # only the invalid bytes are escaped
    same_weights_other_tokenizer = sources.Model(m.cfg, m.graphdef, m.params, "byte", "run", "tiny-byte")
    with pytest.raises(errors.UserError, match="another tokenizer"):
        lm.decode(blob, same_weights_other_tokenizer)
