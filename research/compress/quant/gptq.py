"""GPTQ (Frantar et al. 2022, "Accurate Post-Training Quantization for Generative Pre-trained Transformers"):
weight-only quantization that quantizes one input column at a time and spreads each column's rounding error over
the columns not yet quantized, through the upper Cholesky factor of the inverse Hessian H = X^T X of calibration
inputs. Lazy batch updates over blocks of `blocksize` columns, dampening, optional act-order (columns in order of
decreasing diag H) and groups (one scale per `group_size` inputs of each output).

Layers are processed block by block with inputs propagated through the already-quantized blocks (`calib.walk`), as
in the reference code (IST-DASLab/gptq). The state has RTN's format (`rtn`): uint8 codes, float32 scales, uint8
zero points, so `apply` dequantizes and packing stores the codes.

Choices, each as in the reference unless said: scales of "tensor" and "channel" grids are fitted once on the whole
weight before the sweep; "group" scales are fitted when the sweep reaches the group, on the already-updated weights
(the block size is rounded to a multiple of the group size so a group lies in one block); with act-order and
groups, the group scales are fitted up front on the original weights (the reference's `static_groups`), so groups
stay consecutive inputs. Weights that are exactly zero on entry (pruned by an earlier transform in a chain) are
held at code zero and their error is propagated like any other, so pruning masks survive (SparseGPT-style joint
compensation).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from research import errors
from research.compress import calib, core
from research.compress import hessian as hessian_lib
from research.compress.quant import grid as qgrid
from research.compress.quant import rtn as rtn_lib

_HIGHEST = jax.lax.Precision.HIGHEST


def _codes(w, s, z, maxq):
    return jnp.clip(jnp.round(w / s + z), 0, maxq)


@functools.partial(jax.jit, static_argnames=("bs", "g", "grid"))
def _sweep(w, u, s_all, z_all, valid, bs: int, g: int, grid: qgrid.Grid):
    """The blocked GPTQ sweep.

    Args:
      w: (out, in) weights, `in` a multiple of bs.
      u: (in, in) upper Cholesky factor of H^-1.
      s_all, z_all: (out, in) scale and zero point of every weight (overwritten per group when g > 0).
      valid: (out, in) bool, False where the weight must stay exactly zero.
      bs: block size; g: dynamic group size (0: scales fixed), a divisor of bs.
      grid: the grid (for group fits).

    Returns:
      (out, in) float codes, and the (out, in) scales and zero points used.
    """
    dout, din = w.shape
    maxq = grid.maxq
    channel = qgrid.Grid(grid.bits, grid.symmetric, "channel")

    def block(b, carry):
        w, codes, s_all, z_all = carry
        i1 = b * bs
        w1 = jax.lax.dynamic_slice(w, (0, i1), (dout, bs))  # (out, bs)
        u1 = jax.lax.dynamic_slice(u, (i1, i1), (bs, bs))
        s1 = jax.lax.dynamic_slice(s_all, (0, i1), (dout, bs))
        z1 = jax.lax.dynamic_slice(z_all, (0, i1), (dout, bs))
        v1 = jax.lax.dynamic_slice(valid, (0, i1), (dout, bs))

        def column(i, c):
            w1, s1, z1, q1, err1 = c
            if g:

                def refit(sz):
                    part = jax.lax.dynamic_slice(w1, (0, i), (dout, g))  # (out, g), already updated
                    s, z = qgrid.fit(part.T, channel)  # (out,) each
                    return tuple(
                        jax.lax.dynamic_update_slice(a, jnp.repeat(v[:, None], g, 1), (0, i))
                        for a, v in zip(sz, (s, z))
                    )

                s1, z1 = jax.lax.cond(i % g == 0, refit, lambda sz: sz, (s1, z1))
            col = w1[:, i]
            code = jnp.where(v1[:, i], _codes(col, s1[:, i], z1[:, i], maxq), z1[:, i])  # pruned: the zero code
            q = (code - z1[:, i]) * s1[:, i]
            e = (col - q) / u1[i, i]
            w1 = w1 - e[:, None] * u1[i][None, :]  # upper triangular: earlier columns untouched; column i -> q
            return w1, s1, z1, q1.at[:, i].set(code), err1.at[:, i].set(e)

        init = (w1, s1, z1, jnp.zeros_like(w1), jnp.zeros_like(w1))
        w1, s1, z1, q1, err1 = jax.lax.fori_loop(0, bs, column, init)
        rows = jax.lax.dynamic_slice(u, (i1, 0), (bs, din))  # (bs, in), zero before i1
        w = w - jnp.dot(err1, rows, precision=_HIGHEST)
        w = jax.lax.dynamic_update_slice(w, w1, (0, i1))
        codes = jax.lax.dynamic_update_slice(codes, q1, (0, i1))
        s_all = jax.lax.dynamic_update_slice(s_all, s1, (0, i1))
        z_all = jax.lax.dynamic_update_slice(z_all, z1, (0, i1))
        return w, codes, s_all, z_all

    return jax.lax.fori_loop(0, din // bs, block, (w, jnp.zeros_like(w), s_all, z_all))[1:]


def quantize_layer(
    kernel,
    hessian,
    grid: qgrid.Grid,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    name: str = "layer",
):
    """GPTQ of one linear layer.

    Args:
      kernel: (in, out) weights.
      hessian: (in, in) X^T X of the layer's calibration inputs.
      grid: the quantization grid.
      blocksize: columns per lazy-update block.
      percdamp: damping, a fraction of the mean diagonal of H.
      act_order: quantize inputs in order of decreasing diag(H).
      name: the layer, for messages.

    Returns:
      (codes (in, out) uint8, scale, zero uint8), scale/zero of the grid's scale shape; `qgrid.dequantize` of them
      is the quantized kernel.
    """
    din = kernel.shape[0]
    qgrid.check_shape(kernel.shape, grid, name)
    qgrid.check_finite(kernel, name)
    h = jnp.asarray(hessian, jnp.float32)
    if h.shape != (din, din):
        raise errors.UserError(f"gptq: {name} has {din} inputs but its Hessian is {tuple(h.shape)}")
    if not bool(jnp.all(jnp.isfinite(h))):
        raise errors.UserError(f"gptq: the Hessian of {name} has NaN/inf entries; check the calibration inputs")
    kernel = jnp.asarray(kernel, jnp.float32)
    dead = jnp.diag(h) == 0
    valid = (kernel != 0) & ~dead[:, None]  # (in, out)
    kernel = jnp.where(dead[:, None], 0.0, kernel)
    dynamic = grid.granularity == "group" and not act_order
    g = grid.group_size if dynamic else 0
    bs = max(g, blocksize // g * g) if g else min(blocksize, din)
    # Scales fixed before the sweep: whole-weight fits, or act-order's static groups; per weight, (in, out).
    s0, z0 = qgrid.fit(kernel, grid)
    s_full = jnp.broadcast_to(qgrid.expand(s0, kernel.shape, grid), kernel.shape)
    z_full = jnp.broadcast_to(qgrid.expand(z0, kernel.shape, grid), kernel.shape)
    perm = jnp.argsort(-jnp.diag(h), stable=True) if act_order else jnp.arange(din)
    h = h[perm][:, perm]
    u = hessian_lib.inverse_factor(h, float(percdamp), name, "gptq")
    pad = -din % bs
    w, s_all, z_all, v = (jnp.pad(a[perm].T, ((0, 0), (0, pad))) for a in (kernel, s_full, z_full, valid))
    s_all = s_all.at[:, din:].set(1.0)
    u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag((jnp.arange(din + pad) >= din).astype(jnp.float32))
    codes, s_all, z_all = _sweep(w, u, s_all, z_all, v, bs, g, grid)
    inv = jnp.argsort(perm)
    codes, s_all, z_all = (a[:, :din].T[inv] for a in (codes, s_all, z_all))  # (in, out), original order
    if not bool(jnp.all(jnp.isfinite(s_all))):
        raise errors.UserError(f"gptq: the quantization of {name} is not finite; raise percdamp")
    if grid.granularity == "group":
        scale, zero = s_all[:: grid.group_size], z_all[:: grid.group_size]  # (in // g, out)
    else:
        scale, zero = s0, z0
    return codes.astype(jnp.uint8), scale, zero.astype(jnp.uint8)


def gptq(
    bits: int = 4,
    *,
    where: str = core.BLOCK_KERNELS,
    symmetric: bool = True,
    granularity: str = "channel",
    group_size: int = 128,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
) -> core.Transform:
    """GPTQ weight quantization, computed from calibration data in init.

    Args:
      bits, symmetric, granularity, group_size: the grid (see `grid.Grid`).
      where: path regex of the kernels to quantize (linear kernels inside the blocks).
      blocksize: columns per lazy-update block.
      percdamp: damping of the Hessian's diagonal, as a fraction of its mean.
      act_order: quantize inputs in order of decreasing diag(H).

    Returns:
      A Transform with RTN's state format ({"codes", "scale", "zero"}); apply dequantizes.
    """
    grid = qgrid.Grid(bits, symmetric, granularity, group_size)
    core.check_pattern(where)
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise errors.UserError(f"gptq blocksize must be a positive integer, got {blocksize!r}")
    if not isinstance(percdamp, int | float) or isinstance(percdamp, bool) or not 0 <= percdamp < 1:
        raise errors.UserError(f"gptq percdamp must be in [0, 1), got {percdamp!r}")

    def init(params, key, calib_data):
        calib_data = calib.require(calib_data, "gptq")
        paths = core.select(params, where)
        flat = core.touched(params)
        for p in paths:
            qgrid.check_shape(flat[p].shape, grid, p)
            qgrid.check_finite(flat[p], p)
        leaves = {}

        def visit(i, stats, n_tokens, kernels):
            out = {}
            for name, k in kernels.items():
                path = f"layers/{i}/{name}/kernel"
                c, s, z = quantize_layer(
                    k, stats[name], grid, blocksize=blocksize, percdamp=percdamp, act_order=act_order, name=path
                )
                leaves[path] = (c, s, z)
                out[name] = qgrid.dequantize(c, s, z, grid).astype(k.dtype)
            return out

        calib.walk(calib_data, params, paths, visit, stat="hessian", desc="gptq")
        return rtn_lib.codes_state(params, leaves)

    return core.Transform(init, rtn_lib.dequantizer(grid))
