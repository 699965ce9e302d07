"""GGUF out: grid codes written as they are, GGUF -> ziplm -> GGUF byte for byte, types, tokenizers, refusals."""

from __future__ import annotations

import dataclasses
import re

import gguf as gguf_lib
import jax
import numpy as np
import pytest

from research import cli, errors, sources, tree
from research.coding import artifact
from research.compress import core
from research.compress.quant import rtn
from research.compress.share import codebook
from research.export import blocks
from research.export import gguf as gguf_out
from research.models import config as model_config
from research.models import zoo
from tests import gguf_files, helpers
from tests.models.test_gguf import _tiny

BLOCK_TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]


def _source(tmp_path, vocab=128, d=64, tokenizer=None, types=None, tie=True):
    cfg, params = _tiny(vocab=vocab, d=d, tie=tie)
    gguf_files.write_llama(tmp_path / "src.gguf", cfg, params, types=types, tokenizer=tokenizer)
    return sources.load(str(tmp_path / "src.gguf"))


def _packed(tmp_path, m, transform, name="c"):
    """m compressed by `transform`, packed into a .zlm with the transform's codes; its path."""
    state = transform.init(m.params, jax.random.PRNGKey(0), None)
    effective = transform.apply(m.params, state)
    out = tmp_path / f"{name}.zlm"
    artifact.pack_model(dataclasses.replace(m, params=effective), out, exported=core.export(transform, m.params, state))
    return out


def _tensors(path) -> dict:
    return {t.name: t for t in gguf_lib.GGUFReader(str(path)).tensors}


def _same_leaves(a, b) -> list[str]:
    fa, fb = tree.flatten(a), tree.flatten(b)
    return [p for p in fa if not np.array_equal(np.asarray(fa[p]), np.asarray(fb[p]))]


@pytest.mark.parametrize("kind", BLOCK_TYPES)
def test_grid_codes_are_written_as_they_are(tmp_path, kind):
    m = _source(tmp_path)
    zlm = _packed(tmp_path, m, rtn.rtn(gguf=kind, sym_scale="reference"))  # not llama.cpp's fit: see below
    out = tmp_path / "o.gguf"
    assert cli.main(["export", "--model", str(zlm), "--format", "gguf", "--type", kind, "--out", str(out)]) == 0
    # the gguf package reads back the very values ziplm evaluates (through the reader, Q/K rows un-permuted); the
    # embedding was dense, so --type rounds it
    assert _same_leaves(sources.load(str(zlm)).params, sources.load(str(out)).params) == ["embed/embedding"]
    tensors = _tensors(out)
    q = tensors["blk.0.attn_q.weight"]
    assert q.tensor_type.name == kind.upper() and tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert tensors["token_embd.weight"].tensor_type.name == kind.upper()  # dense: rounded by llama.cpp's RTN
    if kind == "q4_0":  # the reference scale (max|w| / 7.5) is not llama.cpp's (max / -8): not re-rounded
        data = np.asarray(q.data)
        values = blocks.dequantize(blocks.TYPES["Q4_0"], data)
        assert not np.array_equal(blocks.requantize(blocks.TYPES["Q4_0"], values), data)


def test_auto_type_picks_the_exact_block_type_and_keeps_the_rest_exact(tmp_path):
    m = _source(tmp_path)
    zlm = _packed(tmp_path, m, rtn.rtn(gguf="q5_1", where=r"layers/0/.*kernel"))
    rep = gguf_out.export(m.cfg, sources.load(str(zlm)).params, tmp_path / "o.gguf", codes=_codes(zlm))
    kinds = {t["leaf"]: (t["type"], t["how"]) for t in rep["tensors"]}
    assert kinds["layers/0/mlp/up/kernel"] == ("Q5_1", "grid codes as they are")
    assert kinds["layers/1/mlp/up/kernel"] == ("F32", "exact")
    assert kinds["final_norm/scale"] == ("F32", "vector")
    assert rep["requantized"] == [] and rep["type"] == "ALL_F32"
    assert _same_leaves(sources.load(str(zlm)).params, sources.load(str(tmp_path / "o.gguf")).params) == []


def _codes(zlm):
    from research.coding import pack

    return pack.codes_of(zlm)


def test_gguf_to_ziplm_to_gguf_is_byte_identical(tmp_path):
    names = [f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("self_attn.q_proj", "self_attn.k_proj")]
    names += ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"]
    types = dict(zip(names, ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]))
    m = _source(tmp_path, types=types, tie=False)
    out = tmp_path / "back.gguf"
    assert cli.main(["export", "--model", str(tmp_path / "src.gguf"), "--format", "gguf", "--out", str(out)]) == 0
    src, back = _tensors(tmp_path / "src.gguf"), _tensors(out)
    assert set(src) == set(back)
    for name, t in src.items():
        assert back[name].tensor_type == t.tensor_type, name
        assert np.array_equal(np.asarray(back[name].data).view(np.uint8), np.asarray(t.data).view(np.uint8)), name
    assert {back[n].tensor_type.name for n in back} >= {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"}
    meta_src = gguf_out.gguf_in.metadata(gguf_lib.GGUFReader(str(tmp_path / "src.gguf")))
    meta_back = gguf_out.gguf_in.metadata(gguf_lib.GGUFReader(str(out)))
    for key, value in meta_src.items():
        if key.startswith("llama."):
            assert meta_back[key] == value, key
    back_model = sources.load(str(out))
    assert _same_leaves(m.params, back_model.params) == [] and back_model.tokenizer is None  # written as "none"


def test_float_types_and_what_is_rounded(tmp_path):
    m = _source(tmp_path)
    for kind in ("f32", "f16", "bf16"):
        rep = gguf_out.export(m.cfg, m.params, tmp_path / f"{kind}.gguf", type=kind)
        hows = {t["how"] for t in rep["tensors"] if t["how"] != "vector"}
        assert hows == ({"exact"} if kind == "f32" else {"rounded"}), kind
        back = sources.load(str(tmp_path / f"{kind}.gguf")).params
        emb = np.asarray(tree.flatten(back)["embed/embedding"])
        want = np.asarray(tree.flatten(m.params)["embed/embedding"])
        if kind == "f32":
            assert np.array_equal(emb, want)
        else:  # the float type's rounding, no more
            assert 0 < np.abs(emb - want).max() <= np.abs(want).max() * 2 ** -(8 if kind == "bf16" else 11)


def test_what_a_type_cannot_hold_is_refused_or_requantized(tmp_path, capsys):
    m = _source(tmp_path)
    zlm = _packed(tmp_path, m, rtn.rtn(3, granularity="group", group_size=32))  # float32 scales
    args = ["export", "--model", str(zlm), "--format", "gguf", "--out", str(tmp_path / "o.gguf")]
    assert cli.main([*args, "--type", "q4_0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(r"^error: .*layers/0/attn/q/kernel: Q4_0 cannot hold .* not float16.*--requantize", err)
    assert not (tmp_path / "o.gguf").exists()
    assert cli.main([*args, "--type", "q4_0", "--requantize"]) == 0
    rep = gguf_out.export(m.cfg, m.params, tmp_path / "r.gguf", codes=_codes(zlm), type="q4_0", requantize=True)
    assert len(rep["requantized"]) == 14 and all(t["type"] == "Q4_0" for t in rep["tensors"] if t["how"] != "vector")
    auto = gguf_out.export(m.cfg, sources.load(str(zlm)).params, tmp_path / "a.gguf", codes=_codes(zlm))
    assert {t["type"] for t in auto["tensors"]} == {"F32"} and "not float16" in auto["tensors"][1]["how"] + str(auto)

    wide = _packed(
        tmp_path, m, rtn.rtn(8, symmetric=True, granularity="group", group_size=32, param_dtype="float16"), "w"
    )
    with pytest.raises(errors.UserError, match=r"codes span .* Q4_0 holds -8\.\.7"):
        gguf_out.export(m.cfg, m.params, tmp_path / "w.gguf", codes=_codes(wide), type="q4_0")
    shared = _packed(tmp_path, m, codebook.codebook(2, iters=5, trained=False), "s")
    with pytest.raises(errors.UserError, match="codebook"):
        gguf_out.export(m.cfg, m.params, tmp_path / "s.gguf", codes=_codes(shared), type="q8_0")


def test_bad_requests_are_one_line_errors(tmp_path, capsys):
    m = _source(tmp_path)
    gpt2 = model_config.gpt2_style(vocab_size=64, n_layer=1, n_head=2, d_model=32, max_seq_len=16)
    with pytest.raises(errors.UserError, match="llama and qwen2 families.*gpt2.*--format hf"):
        gguf_out.export(gpt2, {}, tmp_path / "g.gguf")
    with pytest.raises(errors.UserError, match="exists; pass --overwrite"):
        gguf_out.export(m.cfg, m.params, tmp_path / "src.gguf")
    src = str(tmp_path / "src.gguf")
    assert cli.main(["export", "--model", src, "--format", "gguf", "--dtype", "float16", "--out", "x"]) == 2
    assert "--dtype applies to --format hf and compressed-tensors" in capsys.readouterr().err
    assert cli.main(["export", "--model", src, "--type", "q4_0", "--out", str(tmp_path / "x")]) == 2
    assert "--type and --requantize apply to --format gguf" in capsys.readouterr().err
    with pytest.raises(errors.UserError, match="gguf='q4_1' fixes symmetric=False"):
        rtn.rtn(gguf="q4_1", symmetric=True)
    with pytest.raises(errors.UserError, match="copies the tokenizer from .*gone.gguf, which no longer exists"):
        gguf_out.export(m.cfg, m.params, tmp_path / "t.gguf", tokenizer=f"gguf:{tmp_path / 'gone.gguf'}")
    with pytest.raises(errors.UserError, match="gguf must be one of"):
        rtn.rtn(gguf="q3_k")


@helpers.needs_shared
def test_tokenizers_go_out_and_come_back(tmp_path):
    from research.data import tokenizers

    cfg, params = _tiny(vocab=50257, d=32)
    rep = gguf_out.export(cfg, params, tmp_path / "bpe.gguf", tokenizer=f"hf:{helpers.GPT2_TOKENIZER}")
    assert "byte-level BPE" in rep["tokenizer"] and "GPT-2 pre-tokenizer" in rep["tokenizer"]
    back = sources.load(str(tmp_path / "bpe.gguf"))
    text = helpers.WIKITEXT_RAW.read_text(encoding="utf-8")[:20_000]
    ref = tokenizers.load(f"hf:{helpers.GPT2_TOKENIZER}")
    assert np.array_equal(tokenizers.load(back.tokenizer).encode(text), ref.encode(text))
    # a GGUF source's tokenizer is copied field by field
    gguf_out.export(back.cfg, back.params, tmp_path / "again.gguf", tokenizer=back.tokenizer)
    a, b = gguf_lib.GGUFReader(str(tmp_path / "bpe.gguf")), gguf_lib.GGUFReader(str(tmp_path / "again.gguf"))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.pre"):
        assert a.fields[key].contents() == b.fields[key].contents(), key

    small, p = _tiny(vocab=256, d=32)
    gguf_out.export(small, p, tmp_path / "byte.gguf", tokenizer="byte")
    assert sources.load(str(tmp_path / "byte.gguf")).tokenizer == "byte"


REAL = zoo.cached("smollm2-135m", helpers.REAL_MODELS)


@pytest.mark.skipif(REAL is None, reason="SmolLM2-135M not cached (run: ziplm pull smollm2-135m)")
def test_real_smollm2_goes_back_byte_for_byte(tmp_path):
    m = sources.load(str(REAL))
    rep = gguf_out.export(m.cfg, m.params, tmp_path / "s.gguf", tokenizer=m.tokenizer)
    assert rep["types"] == {"Q4_1": 210, "Q8_0": 1} and rep["bytes"] == REAL.stat().st_size
    src, back = _tensors(REAL), _tensors(tmp_path / "s.gguf")
    for name, t in src.items():
        assert back[name].tensor_type == t.tensor_type, name
        assert np.array_equal(np.asarray(back[name].data).view(np.uint8), np.asarray(t.data).view(np.uint8)), name
    a, b = gguf_lib.GGUFReader(str(REAL)), gguf_lib.GGUFReader(str(tmp_path / "s.gguf"))
    assert set(a.fields) == set(b.fields)
    differ = [k for k in a.fields if not k.startswith("GGUF.") and a.fields[k].contents() != b.fields[k].contents()]
    assert differ == ["general.name"]


def test_qat_on_a_gguf_grid_exports_its_codes_as_they_are(tmp_path):
    from research.compress.quant import qat

    m = _source(tmp_path)
    t = qat.qat(gguf="q4_0")
    state = t.init(m.params, jax.random.PRNGKey(0), None)
    moved = tree.map_with_path(lambda p, a: a * 1.01 if p.endswith("kernel") else a, m.params)  # a training step
    state = t.update(moved, state, None, 1)  # min/max scales refitted, in fp16
    effective = t.apply(moved, state)
    rep = gguf_out.export(m.cfg, effective, tmp_path / "q.gguf", codes=core.export(t, moved, state), type="q4_0")
    assert {t["how"] for t in rep["tensors"] if "kernel" in t["leaf"]} == {"grid codes as they are"}
    assert _same_leaves(effective, sources.load(str(tmp_path / "q.gguf")).params) == ["embed/embedding"]
    with pytest.raises(errors.UserError, match="qat keeps integer zero points"):
        qat.qat(gguf="q4_1")


def test_a_grid_the_model_rounds_to_bfloat16_is_written_as_the_model_computes(tmp_path):
    m = _source(tmp_path)
    t = rtn.rtn(gguf="q4_0")
    state = t.init(m.params, jax.random.PRNGKey(0), None)
    effective = tree.map_with_path(
        lambda p, a: np.asarray(a).astype(jax.numpy.bfloat16).astype(np.float32), t.apply(m.params, state)
    )
    found = core.export(t, m.params, state)
    auto = gguf_out.export(m.cfg, effective, tmp_path / "a.gguf", codes=found)
    assert all("grid codes" not in t["how"] for t in auto["tensors"])  # the model's values, exactly (BF16 here)
    assert _same_leaves(effective, sources.load(str(tmp_path / "a.gguf")).params) == []
    q4 = gguf_out.export(m.cfg, effective, tmp_path / "q.gguf", codes=found, type="q4_0")
    hows = {t["how"] for t in q4["tensors"] if "kernel" in t["leaf"]}
    assert hows == {
        "grid codes as they are: the model computes with them rounded to its dtype, which this file does not"
    }


@pytest.mark.parametrize("bits, kind", [(8, "Q8_0"), (4, "Q4_0")])
def test_an_embedding_on_row_groups_of_32_is_a_gguf_block_type(tmp_path, bits, kind):
    m = _source(tmp_path)  # GGUF stores an embedding (V, D) with blocks of 32 along D: ziplm's "row-group" 32
    spec = dict(symmetric=True, granularity="row-group", group_size=32, param_dtype="float16", where="embed/embedding")
    t = rtn.rtn(bits, sym_scale="signed" if bits == 4 else "full", **spec)
    zlm = _packed(tmp_path, m, t)
    rep = gguf_out.export(m.cfg, sources.load(str(zlm)).params, tmp_path / "o.gguf", codes=_codes(zlm))
    assert {t["leaf"]: (t["type"], t["how"]) for t in rep["tensors"]}["embed/embedding"] == (
        kind,
        "grid codes as they are",
    )
    assert _same_leaves(sources.load(str(zlm)).params, sources.load(str(tmp_path / "o.gguf")).params) == []
