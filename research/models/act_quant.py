"""Dynamic per-token fake quantization of activations (the "A8" of W8A8 studies).

Every token's feature vector x (..., D) gets its own symmetric grid, fitted at run time:
scale = max|x| / (2**(bits-1) - 1), codes round(x / scale) in [-(2**(bits-1) - 1), 2**(bits-1) - 1], so the
largest-magnitude feature of every token is exact and 0.0 stays 0.0. Nothing is stored: the grid depends only on
the token itself, so a token's quantized value is the same in a full forward pass and in KV-cache decoding.

Gradient: straight-through (the identity). With a per-token max-abs grid nothing is ever clipped, so the clipped
estimator of `fake` would be the identity as well.

The model applies it where `ModelConfig.act_bits` is set: to the input of every linear layer inside the blocks
(q, k, v, o, gate, up, down), the layers whose weights the compression methods quantize. It lives under `models/`
because the model owns it (`models/` imports nothing from `compress/`); a compress config turns it on with a
{"method": "act_quant", "bits": 8} entry (see `compress.pipeline`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from research import errors

BITS = range(2, 17)


def check_bits(bits) -> int:
    """bits as an int in 2..16; anything else is a UserError."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise errors.UserError(f"activation bits must be an integer in 2..16, got {bits!r}")
    return bits


def quantize_per_token(x, bits: int):
    """x fake-quantized on a symmetric per-token grid of `bits` bits (see the module docstring).

    Args:
      x: activations (..., D); the last axis is one token's features.
      bits: code width, 2..16.

    Returns:
      The dequantized activations, shape and dtype of x; the backward pass is the identity.
    """
    qmax = 2 ** (bits - 1) - 1
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True)  # (..., 1)
    scale = jnp.where(amax > 0, amax / qmax, 1.0)
    q = (jnp.clip(jnp.round(xf / scale), -qmax, qmax) * scale).astype(x.dtype)
    return x + jax.lax.stop_gradient(q - x)
