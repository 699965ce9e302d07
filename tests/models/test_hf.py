"""Hugging Face import/export without torch: exact round trips, every family's layout, and bad checkpoints."""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from research import errors, models, tree
from research.models import config as mc
from research.models import hf
from research.models.hf import families

CASES = {
    "gpt2": (mc.gpt2_style(vocab_size=50, n_layer=2, n_head=2, d_model=16, max_seq_len=24), None),
    "gpt2-nobias": (mc.gpt2_style(vocab_size=50, n_layer=2, n_head=2, d_model=16, max_seq_len=24, bias=False), None),
    "llama-gqa": (mc.llama_style(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, d_model=16, max_seq_len=24), None),
    "qwen2": (mc.llama_style(vocab_size=50, n_layer=1, n_head=2, d_model=16, max_seq_len=24, qkv_bias=True), None),
    "llama3-rope": (
        mc.llama_style(
            vocab_size=50, n_layer=1, n_head=2, d_model=16, max_seq_len=24, rope_scaling="llama3", rope_factor=8.0,
            rope_original_max_len=16, rope_theta=500.0,
        ),
        None,
    ),
    "mistral": (mc.llama_style(vocab_size=50, n_layer=1, n_head=2, d_model=16, max_seq_len=24, sliding_window=4), None),
    "opt": (mc.gpt2_style(vocab_size=50, n_layer=2, n_head=2, d_model=16, max_seq_len=24, activation="relu"), "opt"),
    "neox": (
        mc.ModelConfig(
            vocab_size=50, n_layer=2, n_head=2, d_model=16, max_seq_len=24, position="rope", rotary_dim=4,
            activation="gelu", tie_embeddings=False, parallel_residual=True,
        ),
        "gpt_neox",
    ),
}  # fmt: skip


def _random_params(cfg, seed=0):
    """Initialised weights with every bias and norm scale perturbed, so that a wrong layout cannot hide."""
    _, params = models.init(cfg, seed)
    keys = iter(jax.random.split(jax.random.key(seed + 1), 1000))
    return jax.tree.map(lambda a: a + 0.1 * jax.random.normal(next(keys), a.shape), params)


def _logits(cfg, params, tokens):
    graphdef, _ = models.abstract(cfg)
    return np.asarray(models.merge(graphdef, params)(jnp.asarray(tokens)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_then_load_is_exact(name, tmp_path):
    cfg, model_type = CASES[name]
    params = _random_params(cfg)
    info = hf.export(cfg, params, tmp_path / "ckpt", model_type=model_type)
    expected_type = model_type or name.split("-")[0].removesuffix("3")
    assert info["model_type"] == expected_type
    pre = hf.load(str(tmp_path / "ckpt"))
    assert pre.model_type == expected_type and pre.tokenizer is None
    got = tree.flatten(pre.params)
    for path, value in tree.flatten(params).items():
        np.testing.assert_array_equal(got[path], value, err_msg=path)
    extra = set(got) - set(tree.flatten(params))
    assert all(p.endswith("bias") and not np.any(got[p]) for p in extra)  # zero biases the family always has
    tokens = np.random.default_rng(0).integers(0, 50, (2, 20))
    np.testing.assert_array_equal(_logits(pre.cfg, pre.params, tokens), _logits(cfg, params, tokens))


def test_layout_rules_invert_each_other():
    rng = np.random.default_rng(0)
    shapes = [(6, 4), (6, 4), (6, 4)]
    for kind in ("concat", "heads"):
        rule = families.Rule("x", ("a", "b", "c"), kind, heads=2)
        arrays = [rng.normal(size=s) for s in shapes]
        fused = families.to_hf(rule, arrays)
        assert fused.shape == families.hf_shape(rule, shapes)
        for a, b in zip(arrays, families.to_ours(rule, fused, shapes)):
            np.testing.assert_array_equal(a, b)
    # GPT-NeoX fuses per head: rows [q_head0, k_head0, v_head0, q_head1, ...] of an (out, in) weight.
    q, k, v = (np.full((6, 4), i, float) for i in range(3))
    fused = families.to_hf(families.Rule("x", ("q", "k", "v"), "heads", heads=2), [q, k, v])
    assert fused[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2]


def test_sharded_and_half_precision_checkpoints(tmp_path):
    cfg = CASES["llama-gqa"][0]
    params = _random_params(cfg)
    info = hf.export(cfg, params, tmp_path / "sharded", max_shard_bytes=4000)
    assert "model.safetensors.index.json" in info["files"] and len(info["files"]) > 2
    got = tree.flatten(hf.load(str(tmp_path / "sharded")).params)
    for path, value in tree.flatten(params).items():
        np.testing.assert_array_equal(got[path], value)
    for dtype in ("bfloat16", "float16"):
        hf.export(cfg, params, tmp_path / dtype, dtype=dtype)
        assert json.loads((tmp_path / dtype / "config.json").read_text())["dtype"] == dtype
        pre = hf.load(str(tmp_path / dtype), dtype="bfloat16")
        assert pre.cfg.dtype == "bfloat16"
        q = tree.flatten(pre.params)["layers/0/attn/q/kernel"]
        want = np.asarray(tree.flatten(params)["layers/0/attn/q/kernel"]).astype(jnp.dtype(dtype)).astype(np.float32)
        assert q.dtype == jnp.float32
        np.testing.assert_array_equal(q, want)


def test_gpt2_checkpoint_without_the_transformer_prefix_loads(tmp_path):
    cfg = CASES["gpt2"][0]
    params = _random_params(cfg)
    hf.export(cfg, params, tmp_path / "a")
    tensors = safetensors.numpy.load_file(str(tmp_path / "a" / "model.safetensors"))
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    tensors["h.0.attn.bias"] = np.ones((1, 1, 24, 24), np.float32)  # the causal-mask buffer old checkpoints carry
    safetensors.numpy.save_file(tensors, str(tmp_path / "a" / "model.safetensors"))
    got = tree.flatten(hf.load(str(tmp_path / "a")).params)
    np.testing.assert_array_equal(got["layers/1/attn/v/kernel"], tree.flatten(params)["layers/1/attn/v/kernel"])


@pytest.fixture
def ckpt(tmp_path):
    cfg = CASES["gpt2"][0]
    hf.export(cfg, _random_params(cfg), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _edit_config(path, **kw):
    c = json.loads((path / "config.json").read_text())
    c.update(kw)
    (path / "config.json").write_text(json.dumps(c))


def _edit_tensors(path, fn):
    f = str(path / "model.safetensors")
    tensors = safetensors.numpy.load_file(f)
    fn(tensors)
    safetensors.numpy.save_file(tensors, f)


def _fails(ckpt, *match):
    with pytest.raises(errors.UserError) as e:
        hf.load(str(ckpt))
    msg = str(e.value)
    assert "\n" not in msg and all(m in msg for m in match), msg


def test_unknown_model_type_lists_the_supported_ones(ckpt):
    _edit_config(ckpt, model_type="t5")
    _fails(ckpt, "'t5'", "gpt2, llama, mistral, qwen2, opt, gpt_neox")


def test_missing_tensor_is_named(ckpt):
    _edit_tensors(ckpt, lambda t: t.pop("transformer.h.1.mlp.c_fc.weight"))
    _fails(ckpt, "missing", "transformer.h.1.mlp.c_fc.weight")


def test_extra_tensor_is_named(ckpt):
    _edit_tensors(ckpt, lambda t: t.update({"transformer.h.2.ln_1.weight": np.ones(16, np.float32)}))
    _fails(ckpt, "unexpected", "transformer.h.2.ln_1.weight")


def test_shape_disagreeing_with_config_names_tensor_and_shapes(ckpt):
    _edit_config(ckpt, vocab_size=60)
    _fails(ckpt, "transformer.wte.weight", "(50, 16)", "(60, 16)")


def test_truncated_safetensors_is_a_clear_error(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    for size in (len(data) // 2, 100, 4):
        f.write_bytes(data[:size])
        _fails(ckpt, "model.safetensors")


def test_integer_tensors_and_unknown_rope_scaling_are_refused(ckpt, tmp_path):
    _edit_tensors(ckpt, lambda t: t.update({"transformer.wpe.weight": np.zeros((24, 16), np.int8)}))
    _fails(ckpt, "transformer.wpe.weight", "I8")
    cfg = CASES["llama-gqa"][0]
    hf.export(cfg, _random_params(cfg), tmp_path / "llama")
    _edit_config(tmp_path / "llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0})
    _fails(tmp_path / "llama", "rope_type 'dynamic'", "supported: default, linear, llama3")


def test_not_a_checkpoint(tmp_path, monkeypatch):
    _fails(tmp_path, "no config.json")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(errors.UserError, match="no model.safetensors"):
        hf.load(str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    t = time.perf_counter()
    with pytest.raises(errors.UserError, match="not in the Hugging Face cache, and the hub is not reachable"):
        hf.load("no-such-org/no-such-model")
    assert time.perf_counter() - t < 10  # at once, not after a minute of download retries


def test_a_malformed_config_json_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    _fails(tmp_path, "holds a JSON list, not an object")


def test_export_refuses_a_non_empty_directory_unless_asked(ckpt):
    cfg = CASES["gpt2"][0]
    params = _random_params(cfg, seed=5)
    before = (ckpt / "model.safetensors").read_bytes()
    with pytest.raises(errors.UserError, match="--overwrite"):
        hf.export(cfg, params, ckpt)
    assert (ckpt / "model.safetensors").read_bytes() == before
    hf.export(cfg, params, ckpt, overwrite=True)
    got = tree.flatten(hf.load(str(ckpt)).params)["embed/embedding"]
    np.testing.assert_array_equal(got, params["embed"]["embedding"])
    assert not [p for p in ckpt.parent.iterdir() if p.name.startswith(".")]  # no temporary directories left


def test_export_of_an_unrepresentable_model_says_why(tmp_path):
    cfg = mc.ModelConfig(vocab_size=50, n_layer=1, n_head=2, d_model=16, norm="rmsnorm", position="learned")
    with pytest.raises(errors.UserError, match="no Hugging Face family represents this model") as e:
        hf.export(cfg, models.init(cfg)[1], tmp_path / "x")
    assert "gpt2: it needs LayerNorm" in str(e.value)
    with pytest.raises(errors.UserError, match="cannot be written as llama"):
        hf.export(CASES["gpt2"][0], models.init(CASES["gpt2"][0])[1], tmp_path / "y", model_type="llama")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
