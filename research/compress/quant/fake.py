"""Fake quantization: dequantize(quantize(w)) in the forward pass, a clipped straight-through gradient backward.

Gradients (jax.custom_vjp):
- w.r.t. w: 1 where w lies inside the representable range [(0 - zero) * scale, (2**bits - 1 - zero) * scale],
  0 outside (the clipped STE of Bengio et al. 2013 / Jacob et al. 2018).
- w.r.t. scale: the LSQ step-size gradient (Esser et al. 2020) summed over each scale's weights:
  (code - zero) - w / scale inside the range, (0 - zero) below it, (2**bits - 1 - zero) above it. LSQ's gradient
  scale factor 1 / sqrt(n * Qp) is not applied; scale the gradient (or the learning rate) where needed.
- w.r.t. zero: 0 (the zero point is an integer code, not trained).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from research.compress.quant import grid as qgrid


def fake_quant(w, scale, zero, grid: qgrid.Grid):
    """q(w) with the clipped straight-through gradient (see module docstring).

    Args:
      w: weights (in, *out).
      scale: float scales of the grid's scale shape (see `grid`).
      zero: integer-valued zero points, same shape as scale (any numeric dtype).
      grid: the grid settings.

    Returns:
      The dequantized weights, shape and dtype of w.
    """
    return _fq(w, jnp.asarray(scale, jnp.float32), jnp.asarray(zero, jnp.float32), grid)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fq(w, scale, zero, grid):
    codes = qgrid.quantize(w, scale, zero, grid)
    return qgrid.dequantize(codes, scale, zero, grid).astype(w.dtype)


def _fq_fwd(w, scale, zero, grid):
    return _fq(w, scale, zero, grid), (w, scale, zero)


def _fq_bwd(grid, res, g):
    w, scale, zero = res
    wf = w.astype(jnp.float32)
    s = grid.layout.expand(scale, w.shape)
    z = grid.layout.expand(zero, w.shape)
    v = wf / s + z  # position on the code axis
    below, above = v < 0, v > grid.maxq
    inside = ~(below | above)
    gf = g.astype(jnp.float32)
    dw = jnp.where(inside, gf, 0.0).astype(w.dtype)
    dq_ds = jnp.where(below, -z, jnp.where(above, grid.maxq - z, jnp.round(v) - z - wf / s))
    dscale = qgrid.reduce(gf * dq_ds, grid, jnp.sum).astype(scale.dtype)
    return dw, dscale, jnp.zeros_like(zero)


_fq.defvjp(_fq_fwd, _fq_bwd)
