"""Parity with transformers' PyTorch models: the proof that import and export are right.

Each case builds a small random model with transformers' own classes, saves it with `save_pretrained`, loads it
here and compares logits on the same token ids; then exports ours and loads that back into transformers. Needs the
`parity` extra (torch==2.13.0); skipped with the reason when torch is absent.
"""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need torch: pip install -e '.[parity]'")
transformers = pytest.importorskip("transformers")

from research import models  # noqa: E402
from research.models import decode, hf  # noqa: E402

V = 96
SMALL = dict(vocab_size=V, max_position_embeddings=64)
LLAMA = dict(**SMALL, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
CASES = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4),
    "gpt2-untied-relu": lambda: transformers.GPT2Config(
        vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, tie_word_embeddings=False,
        activation_function="relu", n_inner=48,
    ),
    "llama-gqa": lambda: transformers.LlamaConfig(**LLAMA, num_key_value_heads=2),
    "llama-bias-headdim": lambda: transformers.LlamaConfig(
        **LLAMA, num_key_value_heads=4, attention_bias=True, mlp_bias=True, tie_word_embeddings=True, head_dim=16,
    ),
    "llama-rope-llama3": lambda: transformers.LlamaConfig(
        **LLAMA, rope_parameters=dict(
            rope_type="llama3", rope_theta=500.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    ),
    "llama-rope-linear": lambda: transformers.LlamaConfig(
        **LLAMA, rope_parameters=dict(rope_type="linear", rope_theta=100.0, factor=4.0)
    ),
    "mistral-window": lambda: transformers.MistralConfig(**LLAMA, num_key_value_heads=2, sliding_window=8),
    "qwen2": lambda: transformers.Qwen2Config(**LLAMA, num_key_value_heads=2, tie_word_embeddings=True),
    "opt": lambda: transformers.OPTConfig(
        **SMALL, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32
    ),
    "gpt_neox-parallel": lambda: transformers.GPTNeoXConfig(
        **SMALL, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.25
    ),
    "gpt_neox-sequential": lambda: transformers.GPTNeoXConfig(
        **SMALL, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.5,
        use_parallel_residual=False,
    ),
}  # fmt: skip
TOL = 1e-4


def _torch_model(name, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(CASES[name](), attn_implementation="eager").eval()
    with torch.no_grad():  # perturb every weight, so that norm scales and biases count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


def _our_logits(pre, ids):
    return np.asarray(models.merge(pre.graphdef, pre.params)(jnp.asarray(ids)))


IDS = np.random.default_rng(0).integers(0, V, (2, 20))


@pytest.mark.parametrize("name", sorted(CASES))
def test_import_and_export_match_transformers(name, tmp_path):
    ref_model = _torch_model(name)
    ref = _torch_logits(ref_model, IDS)
    ref_model.save_pretrained(tmp_path / "hf")
    pre = hf.load(str(tmp_path / "hf"))
    assert pre.model_type == name.split("-")[0]
    np.testing.assert_allclose(_our_logits(pre, IDS), ref, atol=TOL, rtol=0)

    hf.export(pre.cfg, pre.params, tmp_path / "ours", model_type=pre.model_type)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    np.testing.assert_allclose(_torch_logits(back, IDS), ref, atol=TOL, rtol=0)


def test_cached_decoding_matches_transformers(tmp_path):
    _torch_model("llama-gqa").save_pretrained(tmp_path / "hf")
    pre = hf.load(str(tmp_path / "hf"))
    ours = decode.generate(pre.graphdef, pre.params, IDS[:1, :5], 12)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        ref = ref_model.generate(torch.as_tensor(IDS[:1, :5]), max_new_tokens=12, do_sample=False, min_new_tokens=12)
    np.testing.assert_array_equal(ours, ref.numpy())


def test_sharded_and_bf16_transformers_checkpoints_load(tmp_path):
    model = _torch_model("opt")
    ref = _torch_logits(model, IDS)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    np.testing.assert_allclose(_our_logits(hf.load(str(tmp_path / "sharded")), IDS), ref, atol=TOL, rtol=0)

    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    ref_bf16_weights = _torch_logits(model.to(torch.float32), IDS)  # bf16-rounded weights, fp32 compute
    np.testing.assert_allclose(_our_logits(hf.load(str(tmp_path / "bf16")), IDS), ref_bf16_weights, atol=TOL, rtol=0)
