"""compressed-tensors out: the packing hand-checked, the package's own decompression (parity extra) giving ziplm's
values bit for bit, transformers loading the directory to ziplm's logits, refusals."""

from __future__ import annotations

import glob
import json

import jax
import numpy as np
import pytest

from research import cli, errors, models, tree
from research import codes as codes_lib
from research.compress import core
from research.compress.quant import rtn
from research.compress.share import codebook
from research.export import compressed_tensors as ct
from tests.export.test_gguf_out import _packed, _source
from tests.models.test_gguf import _tiny


def test_pack_puts_element_i_at_bits_i_times_width():
    q = np.array([[*range(8), *range(-8, 0)]])  # signed int4 codes, stored as u = q + 8
    words = ct.pack(q + 8, 4).view(np.uint32)
    assert words.tolist() == [[0xFEDCBA98, 0x76543210]]
    u8 = np.array([[0, 1, 255, 128, 7]])
    assert ct.pack(u8, 8).view(np.uint32).tolist() == [[0x80FF0100, 0x00000007]]  # last word zero-padded


def _compressed(transform, tie=False):
    cfg, params = _tiny(vocab=128, d=64, tie=tie)
    state = transform.init(params, jax.random.PRNGKey(0), None)
    return cfg, transform.apply(params, state), codes_lib.to_numpy(core.export(transform, params, state))


def _decompressed(directory):
    torch = pytest.importorskip("torch", reason="parity extra (torch) not installed")
    pytest.importorskip("compressed_tensors", reason="parity extra (compressed-tensors) not installed")
    from compressed_tensors.entrypoints.convert.converters import CompressedTensorsDequantizer
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(glob.glob(f"{directory}/*.safetensors")):
        tensors.update(load_file(f))
    dense = CompressedTensorsDequantizer(str(directory), dtype=torch.float32, ignore=["model.embed_tokens"])
    return {k: v.float().numpy() for k, v in dense.process(tensors).items()}


def _kernel(flat, name):
    """Our (in, out) kernel of an HF Linear weight name, as (out, in)."""
    _, _, i, part, proj, _ = name.split(".")
    return np.asarray(flat[f"layers/{i}/{'attn' if part == 'self_attn' else 'mlp'}/{proj[:-5]}/kernel"]).T


GRIDS = {
    "int4-sym-g32": dict(bits=4, symmetric=True, granularity="group", group_size=32),
    "int4-asym-g32": dict(bits=4, granularity="group", group_size=32),
    "int8-sym-channel": dict(bits=8, symmetric=True),
    "int8-asym-channel": dict(bits=8),
    "int3-as-int4": dict(bits=3, granularity="group", group_size=16),
    "int4-tensor": dict(bits=4, granularity="tensor"),
}


@pytest.mark.parametrize("name", GRIDS)
def test_the_package_decompresses_to_the_values_ziplm_evaluates(tmp_path, name):
    cfg, effective, found = _compressed(rtn.rtn(**GRIDS[name]))
    rep = ct.export(cfg, effective, tmp_path / "ct", codes=found, dtype="float32")
    assert rep["rounded_scales"] == [] and len(rep["quantized"]) == 14
    dense = _decompressed(tmp_path / "ct")
    flat = tree.flatten(effective)
    linears = [k for k in dense if k.startswith("model.layers.") and "_proj.weight" in k]
    assert len(linears) == 14
    for k in linears:
        assert np.array_equal(dense[k], _kernel(flat, k)), k
    q = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    weights = q["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == (8 if "int8" in name else 4) and q["ignore"] == ["lm_head"]
    assert q["quantization_status"] == "compressed"
    if "sym" in name:  # a per-tensor asymmetric grid may land on zero 8 (symmetric) for some leaves
        assert weights["symmetric"] == ("-sym" in name)


def test_bfloat16_scales_are_reported_and_close(tmp_path):
    cfg, effective, found = _compressed(rtn.rtn(4, granularity="group", group_size=32))
    rep = ct.export(cfg, effective, tmp_path / "ct", codes=found)  # default bfloat16
    assert len(rep["rounded_scales"]) == 14 and "scales rounded to bfloat16" in ct.summary(rep)
    dense, flat = _decompressed(tmp_path / "ct"), tree.flatten(effective)
    name = "model.layers.0.mlp.up_proj.weight"
    want = _kernel(flat, name)
    assert 0 < np.abs(dense[name] - want).max() <= 2**-7 * np.abs(want).max()


def test_transformers_loads_it_to_ziplm_logits(tmp_path):
    torch = pytest.importorskip("torch", reason="parity extra (torch) not installed")
    pytest.importorskip("compressed_tensors", reason="parity extra (compressed-tensors) not installed")
    import transformers

    cfg, effective, found = _compressed(rtn.rtn(4, symmetric=True, granularity="group", group_size=32))
    ct.export(cfg, effective, tmp_path / "ct", codes=found, dtype="float32")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32)
    tokens = np.arange(48)[None] % cfg.vocab_size
    with torch.no_grad():
        want = model(torch.tensor(tokens)).logits.numpy()
    graphdef, _ = models.init(cfg, 0)
    assert np.abs(np.asarray(models.merge(graphdef, effective)(tokens)) - want).max() < 1e-4


def test_schemes_groups_and_ignored_layers(tmp_path):
    t = core.chain(rtn.rtn(4, where=r"layers/\d+/attn/.*kernel"), rtn.rtn(8, where=r"layers/0/mlp/.*kernel"))
    cfg, effective, found = _compressed(t)
    rep = ct.export(cfg, effective, tmp_path / "ct", codes=found, dtype="float32")
    q = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    groups = sorted(q["config_groups"].values(), key=lambda g: g["weights"]["num_bits"])
    assert [g["weights"]["num_bits"] for g in groups] == [4, 8]
    assert len(groups[0]["targets"]) == 8 and "model.layers.1.self_attn.o_proj" in groups[0]["targets"]
    assert groups[1]["targets"] == [f"model.layers.0.mlp.{n}_proj" for n in ("down", "gate", "up")]
    assert q["ignore"] == ["lm_head"] + [f"model.layers.1.mlp.{n}_proj" for n in ("down", "gate", "up")]
    assert rep["ignored"] == q["ignore"]  # the untied head is a Linear with no grid


def test_what_it_cannot_hold_is_refused(tmp_path, capsys):
    for transform, why in [
        (codebook.codebook(2, iters=5, trained=False), "codebook"),
        (rtn.rtn(gguf="q4_1"), "float minimum"),
    ]:
        cfg, effective, found = _compressed(transform)
        with pytest.raises(errors.UserError, match=why):
            ct.export(cfg, effective, tmp_path / "x", codes=found)
        assert not (tmp_path / "x").exists()
    cfg, effective, found = _compressed(core.chain(rtn.rtn(8), rtn.rtn(4, where="embed/embedding")))
    rep = ct.export(cfg, effective, tmp_path / "e", codes=found, dtype="float32")  # the embedding as its values
    assert rep["floats"] == ["embed/embedding"] and "written as floats: embed/embedding" in ct.summary(rep)
    assert np.array_equal(
        _decompressed(tmp_path / "e")["model.embed_tokens.weight"],
        np.asarray(tree.flatten(effective)["embed/embedding"]),
    )
    cfg, params = _tiny(vocab=128, d=64)
    with pytest.raises(errors.UserError, match="no grid-quantized Linear weights"):
        ct.export(cfg, params, tmp_path / "x", codes={})
    m = _source(tmp_path)  # the CLI from a packed model
    zlm = _packed(tmp_path, m, rtn.rtn(8, symmetric=True))
    out = tmp_path / "cli"
    assert cli.main(["export", "--model", str(zlm), "--format", "compressed-tensors", "--out", str(out)]) == 0
    assert "quantized: 14 int8 channel" in capsys.readouterr().out


def test_a_packed_head_is_not_ignored_and_a_bf16_model_is_reported(tmp_path):
    cfg, effective, found = _compressed(rtn.rtn(4, symmetric=True, where=r".*kernel"))  # lm_head too
    ct.export(cfg, effective, tmp_path / "h", codes=found, dtype="float32")
    q = json.loads((tmp_path / "h" / "config.json").read_text())["quantization_config"]
    assert q["ignore"] == [] and np.array_equal(
        _decompressed(tmp_path / "h")["lm_head.weight"], np.asarray(tree.flatten(effective)["lm_head/kernel"]).T
    )
    bf16 = tree.map_with_path(lambda p, a: np.asarray(a).astype(jax.numpy.bfloat16).astype(np.float32), effective)
    rep = ct.export(cfg, bf16, tmp_path / "b", codes=found, dtype="float32")
    assert len(rep["rounded_values"]) == 15 and "which the model rounds to its dtype" in ct.summary(rep)
