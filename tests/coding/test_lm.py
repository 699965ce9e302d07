"""Coding data with a model: exact round trips for any bytes (the device-side float32 tables), the coded size
against the model's log-loss, the cache sized to the window used, the stored fallback, damaged or tampered files
and the wrong model refused."""

import functools
import io

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from research import errors, models, sources, tree
from research.coding import lm
from research.models import config as model_config
from research.models import decode as decode_lib
from research.train import step as train_step
from tests.helpers import GPT2_TOKENIZER, needs_shared


def _model(tokenizer="byte", vocab=256, seed=0, context=16):
    cfg = model_config.gpt2_style(vocab_size=vocab, n_layer=2, n_head=2, d_model=32, max_seq_len=context)
    graphdef, params = models.init(cfg, seed=seed)
    return sources.Model(cfg, graphdef, params, tokenizer, "run", f"tiny-{seed}")


def _unigram(model, favoured: bytes, logit: float = 6.0):
    """The model turned into a fixed unigram model that favours the bytes `favoured` (so text compresses)."""
    bias = np.zeros(model.cfg.d_model, np.float32)
    bias[0] = 1.0
    table = np.zeros(model.cfg.vocab_size, np.float32)
    table[list(favoured)] = logit

    def edit(path, x):
        if path == "final_norm/scale":
            return jnp.zeros_like(x)
        if path == "final_norm/bias":
            return jnp.asarray(bias)
        if path == "embed/embedding":
            return x.at[:, 0].set(jnp.asarray(table))
        return x

    params = tree.map_with_path(edit, model.params)
    return sources.Model(model.cfg, model.graphdef, params, model.tokenizer, "run", "unigram")


BYTE = _model()
TEXT = b"the quick brown fox jumps over the lazy dog " * 10
UNIGRAM = _unigram(BYTE, b"abcdefghijklmnopqrstuvwxyz ")


@given(st.binary(max_size=120), st.integers(1, 16), st.integers(1, 5))
@settings(max_examples=25, deadline=None)
def test_any_bytes_round_trip_at_any_chunking(data, chunk_len, batch_size):
    blob, rep = lm.encode(data, BYTE, chunk_len=chunk_len, batch_size=batch_size, fallback=False)
    out, _ = lm.decode(blob, BYTE)
    assert out == data and rep["input_bytes"] == len(data) and not rep["stored"]


_LLAMA_CFG = model_config.llama_style(vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=4096)
LLAMA = sources.Model(_LLAMA_CFG, *models.init(_LLAMA_CFG), "byte", "run", "tiny-llama")


@given(st.binary(max_size=200), st.sampled_from([(8, 3), (8, 8), (32, 20)]), st.integers(1, 4))
@settings(max_examples=10, deadline=None)
def test_float32_device_tables_round_trip_with_a_capped_context(data, context_chunk, batch_size):
    """A RoPE model with a 4096-token context (vocab 300 > the bytes it codes) at a capped context."""
    context, chunk_len = context_chunk
    blob, rep = lm.encode(data, LLAMA, context=context, chunk_len=chunk_len, batch_size=batch_size, fallback=False)
    assert lm.decode(blob, LLAMA)[0] == data
    assert rep["context"] == context and rep["cache_capacity"] <= context


@pytest.mark.parametrize(
    "data",
    [b"", b"a", bytes(range(256)), b"\xff\xfe\x80 not utf-8 \xc3", b"ab" * 400, "naïve 日本語 ✓ 🜲".encode()],
    ids=["empty", "one", "all-bytes", "invalid-utf8", "repeated", "unicode"],
)
def test_edge_cases_round_trip(data):
    for fallback in (False, True):
        blob, _ = lm.encode(data, BYTE, chunk_len=16, batch_size=4, fallback=fallback)
        assert lm.decode(blob, BYTE)[0] == data


def test_quantized_tables_are_valid_for_any_logits():
    rng = np.random.default_rng(0)
    logits = np.stack([
        rng.normal(0, 3, 1000), np.zeros(1000), np.full(1000, -1e30), np.r_[1e4, np.zeros(999)],
        np.r_[np.inf, np.inf, np.zeros(998)], np.r_[np.nan, np.zeros(999)], np.full(1000, np.inf),
    ]).astype(np.float32)  # fmt: skip
    f = np.asarray(lm.quantize(jnp.asarray(logits))).astype(np.int64)
    assert (f >= 1).all() and (f.sum(-1) < 2**31).all()
    p = np.exp(logits[0] - logits[0].max())
    np.testing.assert_allclose(f[0] / f[0].sum(), p / p.sum(), rtol=1e-3, atol=2e-9)
    assert f[3, 0] > 2**30 - 2000 and f[1].min() == f[1].max()  # peaked and flat rows


def _reference_bits(m, tokens, batch_size, chunk_len, context):
    """The model's log-loss of the tokens under the coder's streams and windows, by full forward passes."""
    keep, span = context - chunk_len + 1, -(-len(tokens) // batch_size)
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


@pytest.mark.parametrize("chunk_len,context", [(16, 16), (8, 16), (5, 12)])
def test_coded_size_is_the_log_loss_plus_a_few_bytes(chunk_len, context):
    data = bytes(np.random.default_rng(0).integers(97, 123, 600, dtype=np.uint8))
    blob, rep = lm.encode(data, BYTE, context=context, chunk_len=chunk_len, batch_size=6, fallback=False)
    bits = _reference_bits(BYTE, np.frombuffer(data, np.uint8).astype(np.int32), 6, chunk_len, context)
    assert rep["ideal_bits"] == pytest.approx(bits, rel=1e-4)
    assert len(blob) <= rep["ideal_bits"] / 8 * 1.001 + 64  # the target: 0.1% + 64 bytes
    assert lm.decode(blob, BYTE)[0] == data


def test_the_cache_is_sized_to_the_window_used(monkeypatch):
    capacities = []
    init_cache = decode_lib.init_cache
    monkeypatch.setattr(
        decode_lib, "init_cache", lambda cfg, b, cap=None: capacities.append(cap) or init_cache(cfg, b, cap)
    )
    data = bytes(range(97, 123)) * 4  # 104 tokens
    blob, rep = lm.encode(data, LLAMA, batch_size=4, fallback=False)  # spans of 26 tokens, one window each
    assert rep["context"] == lm.DEFAULT_CONTEXT and rep["chunk_len"] == lm.DEFAULT_CONTEXT // 2
    assert rep["cache_capacity"] == 26 and rep["cache_bytes"] == lm.cache_bytes(LLAMA.cfg, 4, 26)
    assert lm.decode(blob, LLAMA)[0] == data
    blob, rep = lm.encode(data, LLAMA, context=12, chunk_len=5, batch_size=2, fallback=False)  # 52-token spans
    assert rep["cache_capacity"] == 12  # later windows: 8 tokens of context + 5 new - 1
    assert lm.decode(blob, LLAMA)[0] == data
    assert capacities == [26, 26, 12, 12]  # one cache per call, never the model's 4096
    assert lm.plan(1000, 4, 16, 8).capacity == 16 and lm.plan(10, 4, 16, 8).capacity == 3
    assert lm.plan(0, 4, 16, 8).windows == []


def test_incompressible_input_is_stored_and_grows_by_at_most_ten_bytes():
    data = np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    blob, rep = lm.encode(data, BYTE, batch_size=4)
    assert rep["stored"] and len(blob) == len(data) + lm.STORED_OVERHEAD and rep["ideal_bits"] is None
    assert 0 < rep["gave_up_after_tokens"] < len(data)  # it stopped coding once storing had won
    assert lm.decode(blob, BYTE)[0] == data
    assert lm.decode(blob, None)[0] == data  # a stored file needs no model
    for bad in (blob[:-1], blob[:20] + bytes([blob[20] ^ 8]) + blob[21:], blob + b"\0"):
        with pytest.raises(errors.CorruptData, match="stored file fails its checksum"):
            lm.decode(bad, BYTE)
    blob, rep = lm.encode(TEXT, UNIGRAM, batch_size=4)  # compressible text is coded
    assert not rep["stored"] and len(blob) < 0.8 * len(TEXT) and lm.decode(blob, UNIGRAM)[0] == TEXT
    with pytest.raises(errors.UserError, match="coded with a model"):
        lm.decode(blob, None)


def test_damaged_files_and_the_wrong_model_fail_cleanly():
    blob, _ = lm.encode(TEXT, BYTE, chunk_len=16, batch_size=4, fallback=False)
    with pytest.raises(errors.UserError, match="coded with another model"):
        lm.decode(blob, _model(seed=1))
    cases = {
        "magic": (lambda b: b"XXXX" + b[4:], "wrong magic"),
        "version": (lambda b: b[:4] + b"\x09" + b[5:], "version 9"),
        "old version": (lambda b: b[:4] + b"\x01" + b[5:], "version 1; this ziplm reads version 2 .*older ziplm"),
        "flags": (lambda b: b[:5] + b"\x04" + b[6:], "unknown flags"),
        "truncated header": (lambda b: b[:20], "too short|truncated"),
        "truncated payload": (lambda b: b[:-3], "truncated or padded"),
        "flipped header bit": (lambda b: b[:30] + bytes([b[30] ^ 4]) + b[31:], "checksum|truncated"),
        "flipped payload bit": (lambda b: b[:-9] + bytes([b[-9] ^ 1]) + b[-8:], "payload fails its checksum"),
    }
    for bad, match in cases.values():
        with pytest.raises(errors.CorruptData, match=match):
            lm.decode(bad(blob), BYTE)


def test_a_tampered_header_is_refused_never_decoded_wrong():
    blob, _ = lm.encode(TEXT, BYTE, chunk_len=8, batch_size=4, fallback=False)
    header, payload = lm.read_header(blob)
    n_head = header["header_bytes"]
    for i in range(n_head):  # every flipped bit of the header
        for bit in (0, 7):
            bad = blob[:i] + bytes([blob[i] ^ (1 << bit)]) + blob[i + 1 :]
            with pytest.raises(errors.CorruptData):
                lm.decode(bad, BYTE)

    rewritten = functools.partial(lm.with_header, blob)  # header fields changed, checksums recomputed

    assert lm.decode(rewritten(), BYTE)[0] == TEXT
    for changes in (dict(context=15), dict(chunk_len=9), dict(batch_size=3), dict(start_token=32)):
        with pytest.raises(errors.CorruptData, match="SHA-256"):
            lm.decode(rewritten(**changes), BYTE)
    with pytest.raises(errors.UserError, match="context 17 exceeds"):
        lm.decode(rewritten(context=17), BYTE)
    with pytest.raises(errors.CorruptData, match="disagree with its runs"):
        lm.decode(rewritten(tokens=header["tokens"] - 1), BYTE)
    # Sizes no encode writes are refused from the header alone, before anything is allocated from them.
    huge = 10**12
    for changes, match in (
        (dict(batch_size=huge), "streams"),
        (dict(length=huge), "bytes of output"),
        (dict(tokens=len(TEXT) + 1), "tokens for"),
        (dict(chunk_len=huge), "window"),
        (dict(coder_bytes=huge), "payload bytes"),
    ):
        with pytest.raises(errors.CorruptData, match=match):
            lm.read_header(rewritten(**changes))


def test_a_claim_past_the_output_limit_is_refused_before_the_model_runs(tmp_path, capsys, monkeypatch):
    from research import cli
    from research.models import hf

    blob, _ = lm.encode(TEXT, BYTE, chunk_len=8, batch_size=4, fallback=False)
    claim = lm.MAX_EXPANSION * len(blob)  # the most `read_header` lets through, with every checksum right
    crafted = lm.with_header(blob, length=claim, tokens=claim, runs=[["t", claim, claim]])
    assert lm.read_header(crafted)[0]["length"] == claim

    def no_model(*a, **k):
        raise AssertionError("the model ran")

    monkeypatch.setattr(lm, "_run", no_model)
    with pytest.raises(errors.UserError, match=f"claims {claim:,} bytes of output, more than the limit"):
        lm.decode(crafted, BYTE, max_output=claim - 1)
    model, src, out = tmp_path / "model", tmp_path / "crafted.zlmt", tmp_path / "out"
    hf.export(BYTE.cfg, BYTE.params, model, tokenizer="byte")
    src.write_bytes(crafted)
    assert cli.main(["decode", "--model", str(model), str(src), str(out), "--max-output", "1M"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--max-output" in err and "\n" not in err and not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_decode_streams_its_output_with_tokens_on_disk(monkeypatch):
    """Past IN_MEMORY_TOKENS the decoded tokens live in a memory-mapped temporary file, and the bytes go to the
    output run by run (RUN_CHARS at a time): the same bytes as in memory."""
    blob, _ = lm.encode(TEXT, UNIGRAM, chunk_len=8, batch_size=3, fallback=False)
    made = []
    real = lm._token_array
    monkeypatch.setattr(lm, "IN_MEMORY_TOKENS", 16)
    monkeypatch.setattr(lm, "RUN_CHARS", 37)
    monkeypatch.setattr(lm, "_token_array", lambda *a: made.append(real(*a)) or made[-1])
    out = io.BytesIO()
    data, rep = lm.decode(blob, UNIGRAM, out=out)
    assert data is None and out.getvalue() == TEXT and rep["output_bytes"] == len(TEXT)
    assert isinstance(made[0], np.memmap)
    assert lm.decode(blob, UNIGRAM)[0] == TEXT


def test_long_text_is_cut_into_runs_after_newlines(monkeypatch):
    monkeypatch.setattr(lm, "RUN_CHARS", 10)
    text = "line one\nline two is longer than ten\nx\n" + "y" * 25
    pieces = list(lm._pieces(text))
    assert "".join(pieces) == text and all(len(p) <= 10 for p in pieces)
    assert pieces[0] == "line one\n" and pieces[-1] == "y" * 5


def test_bad_settings_are_user_errors():
    with pytest.raises(errors.UserError, match="chunk_len 17 exceeds the model's context"):
        lm.encode(b"abc", BYTE, chunk_len=17)
    with pytest.raises(errors.UserError, match="chunk_len 9 exceeds the context"):
        lm.encode(b"abc", BYTE, context=8, chunk_len=9)
    with pytest.raises(errors.UserError, match="context 17 exceeds the model's context"):
        lm.encode(b"abc", BYTE, context=17)
    with pytest.raises(errors.UserError, match="batch_size must be a positive integer"):
        lm.encode(b"abc", BYTE, batch_size=0)
    with pytest.raises(errors.UserError, match="context must be a positive integer"):
        lm.encode(b"abc", BYTE, context=0)


@needs_shared
def test_tokenizer_models_code_tokens_and_escape_what_does_not_round_trip():
    m = _model(f"hf:{GPT2_TOKENIZER}", vocab=50257, context=32)
    data = "Hello, world! naïve café 日本 \u200b".encode() + b"\xff\xfe raw" + b" and back to text."
    blob, rep = lm.encode(data, m, chunk_len=32, batch_size=2, fallback=False)
    assert lm.decode(blob, m)[0] == data
    assert rep["tokens"] < len(data) and rep["escape_bytes"] == 2  # only the invalid bytes are escaped
    same_weights_other_tokenizer = sources.Model(m.cfg, m.graphdef, m.params, "byte", "run", "tiny-byte")
    with pytest.raises(errors.UserError, match="another tokenizer"):
        lm.decode(blob, same_weights_other_tokenizer)
    noise = np.random.default_rng(2).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    blob, rep = lm.encode(noise, m, batch_size=4)  # random bytes through a 50k-vocabulary coder
    assert rep["stored"] and len(blob) <= len(noise) + lm.STORED_OVERHEAD and lm.decode(blob, m)[0] == noise
    assert rep["gave_up_after_tokens"] == 0 and rep["model_seconds"] == 0  # the escapes alone cost more: no model


def test_cli_encode_decode_round_trip(tmp_path, capsys):
    from research import cli
    from research.models import hf

    model = tmp_path / "model"
    hf.export(UNIGRAM.cfg, UNIGRAM.params, model, tokenizer="byte")
    noise = np.random.default_rng(3).integers(0, 256, 500, dtype=np.uint8).tobytes()
    for name, data in (("text", TEXT), ("noise", noise)):
        src, coded, back = (tmp_path / f"{name}.{ext}" for ext in ("in", "zlmt", "out"))
        src.write_bytes(data)
        assert cli.main(["encode", "--model", str(model), str(src), str(coded), "--context", "8"]) == 0
        line = capsys.readouterr().out
        assert ("stored raw" in line) == (name == "noise") and "tokens/s" in line and " 0.0 kB/s" not in line
        assert cli.main(["decode", "--model", str(model), str(coded), str(back)]) == 0
        assert back.read_bytes() == data and "checksum verified" in capsys.readouterr().out
    assert lm.read_header((tmp_path / "text.zlmt").read_bytes())[0]["context"] == 8
    assert cli.main(["encode", "--model", str(model), str(src), str(coded), "--context", "99", "--overwrite"]) == 2
    assert "context 99 exceeds the model's context (16)" in capsys.readouterr().err


def test_streams_split_over_devices_round_trip_and_code_as_on_one(tmp_path, capsys):
    from research import cli
    from research.models import hf
    from research.parallel import sharding

    m = _model(context=32)
    data = b"the streams of a coded file, split over four devices; " * 12
    rows = sharding.batch_sharding(sharding.make_mesh(4, 1), ("data",))
    one, rep1 = lm.encode(data, m, batch_size=8, fallback=False)
    four, rep4 = lm.encode(data, m, batch_size=8, fallback=False, sharding=rows)
    assert rep4["devices"] == 4 and rep1["devices"] == 1
    assert abs(rep4["ideal_bits"] - rep1["ideal_bits"]) <= 1e-3 * rep1["ideal_bits"]
    assert lm.decode(four, m, rows)[0] == data
    assert len(four) == pytest.approx(len(one), abs=8)  # the same tables but for float rounding
    with pytest.raises(errors.UserError, match="do not split evenly over 4 devices"):
        lm.encode(data, m, batch_size=6, sharding=rows)
    # The CLI: --devices on both sides, named in the encoder's line.
    model = tmp_path / "model"
    hf.export(UNIGRAM.cfg, UNIGRAM.params, model, tokenizer="byte")
    src, coded, back = tmp_path / "in", tmp_path / "coded", tmp_path / "out"
    src.write_bytes(TEXT)
    assert cli.main(["encode", "--model", str(model), str(src), str(coded), "--devices", "2", "--batch-size", "4"]) == 0
    assert "decode with --devices 2" in capsys.readouterr().out and not lm.read_header(coded.read_bytes())[0]["stored"]
    assert cli.main(["decode", "--model", str(model), str(coded), str(back), "--devices", "2"]) == 0
    assert back.read_bytes() == TEXT
    assert cli.main(["decode", "--model", str(model), str(coded), str(back), "--devices", "9", "--overwrite"]) == 2
    assert "--devices 9: only 8 device(s) are available" in capsys.readouterr().err


def test_compare_rows_count_the_model_file_and_verify_by_default(tmp_path, monkeypatch):
    from research.coding import compare

    f = tmp_path / "model.zlm"
    f.write_bytes(b"m" * 1000)
    monkeypatch.setattr(sources, "load", lambda path: UNIGRAM)
    rows = {r["coder"]: r for r in compare.rows(TEXT, {"u": f}, batch_size=2, progress=None)}
    u = rows["model: u"]
    assert {"gzip -9", "bz2 -9", "xz -9e"} <= set(rows) and u["decoded"] and u["decode_kb_per_s"] > 0
    assert u["model_bytes"] == 1000 and u["total_bytes"] == 1000 + u["data_bytes"] < len(TEXT) + 1000
    (only,) = compare.rows(TEXT, {"u": f}, batch_size=2, progress=None, classics=False, verify=False)
    assert only["decoded"] is False and only["decode_kb_per_s"] is None and only["data_bytes"] == u["data_bytes"]
