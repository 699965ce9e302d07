"""Per-token activation fake quantization: the grid by hand, the identity gradient, the model and decoding paths,
and the compress pipeline's act_quant entry (W8A8)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import errors, models
from research.models import act_quant as act
from research.models import config, decode


def test_per_token_grid_by_hand():
    x = jnp.array([[[1.0, -0.5, 0.26, 0.0], [0.0, 0.0, 0.0, 0.0], [-3.0, 1.0, 0.4, 2.9]]])  # (1, 3, 4)
    q = np.asarray(act.quantize_per_token(x, 3))  # codes in [-3, 3]: scale = max|x| / 3 per token
    np.testing.assert_allclose(q[0, 0], [1.0, -2 / 3, 1 / 3, 0.0], rtol=1e-6)  # round(-1.5) = -2 (to even)
    np.testing.assert_array_equal(q[0, 1], 0.0)  # an all-zero token stays zero (no division by zero)
    np.testing.assert_allclose(q[0, 2], [-3.0, 1.0, 0.0, 3.0], rtol=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_values_lie_on_each_tokens_grid(bits):
    x = jax.random.normal(jax.random.key(0), (2, 5, 64)) * jnp.arange(1, 6)[None, :, None]
    q = np.asarray(act.quantize_per_token(x, bits), np.float64)
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(np.asarray(x, np.float64)).max(-1, keepdims=True) / qmax
    codes = q / scale
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
    assert np.abs(codes).max() <= qmax + 1e-3
    assert np.abs(q - np.asarray(x)).max() <= (scale / 2).max() * (1 + 1e-5)  # round-to-nearest, nothing clipped


def test_gradient_is_the_identity():
    x = jax.random.normal(jax.random.key(1), (3, 8))
    g = jax.grad(lambda v: jnp.sum(act.quantize_per_token(v, 4) * jnp.arange(8.0)))(x)
    np.testing.assert_array_equal(g, np.broadcast_to(np.arange(8.0), (3, 8)))


def test_model_quantizes_linear_inputs_and_decoding_agrees():
    base = config.gpt2_style(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=16)
    graphdef, params = models.init(base, seed=0)
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, 64)
    dense = np.asarray(models.merge(graphdef, params)(tokens))
    errs = {}
    for bits in (8, 3):
        g8 = models.abstract(base.replace(act_bits=bits))[0]
        logits = np.asarray(models.merge(g8, params)(tokens))
        errs[bits] = np.abs(logits - dense).max()
        # The KV-cache path sees the same per-token grids, so block-by-block decoding equals the full forward.
        cache = decode.init_cache(base.replace(act_bits=bits), 2, 16)
        first, cache = decode.step(g8, params, cache, tokens[:, :5])
        rest, _ = decode.step(g8, params, cache, tokens[:, 5:])
        np.testing.assert_allclose(np.concatenate([first, rest], 1), logits, atol=1e-5)
    assert 0 < errs[8] < errs[3]  # quantization happens, and coarser grids cost more


def test_bad_bits_are_user_errors():
    for bits in (1, 17, 8.0, True):
        with pytest.raises(errors.UserError, match="act"):
            config.gpt2_style(act_bits=bits)
        with pytest.raises(errors.UserError):
            act.check_bits(bits)


def test_export_refuses_what_a_hf_config_cannot_express(tmp_path):
    from research.models import hf

    cfg = config.gpt2_style(vocab_size=64, n_layer=1, n_head=2, d_model=32, max_seq_len=16, act_bits=8)
    _, params = models.init(cfg)
    with pytest.raises(errors.UserError, match="act_bits"):
        hf.export(cfg, params, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
