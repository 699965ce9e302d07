"""GPTQ (Frantar et al. 2022, "Accurate Post-Training Quantization for Generative Pre-trained Transformers"):
weight-only quantization that quantizes one input column at a time and spreads each column's rounding error over
the columns not yet quantized, through the upper Cholesky factor of the inverse Hessian H = X^T X of calibration
inputs. Lazy batch updates over blocks of `blocksize` columns, dampening, optional act-order (columns in order of
decreasing diag H) and groups (one scale per `group_size` inputs of each output).

Layers are processed block by block with inputs propagated through the already-quantized blocks (`calib.walk`), as
in the reference code (IST-DASLab/gptq). The state has RTN's format (`rtn`): uint8 codes, float32 scales, uint8
zero points, so `apply` dequantizes and packing stores the codes.

Conventions, and which published code each follows:
- The grid (`grid.Grid`): asymmetric with an integer zero point by default, as the reference scripts
  (IST-DASLab/gptq) quantize; `symmetric=True` with `sym_scale="full"` is ziplm's symmetric grid (max|w| /
  (2^(b-1) - 1), one code unused), `sym_scale="reference"` the reference code's and llm-compressor's (max|w| /
  (2^(b-1) - 0.5)); `zero="float"` with `param_dtype="float16"` is GGUF Q4_1's parametrisation.
- "tensor" and "channel" scales are fitted once on the whole weight before the sweep (as the reference).
- "group" scales, `group_fit`: "block" (default, the reference code) fits a group when the sweep reaches it, on
  the weights as they stand at the start of the current lazy block (updated by earlier blocks, not yet by the
  earlier columns of this block); "sweep" (ziplm's earlier default) fits it on the weights updated by every column
  before it; "static" fits every group up front on the original weights (llm-compressor; the reference's
  `static_groups`). With act-order the groups are always static, so they stay consecutive inputs. The block size
  is rounded to a multiple of the group size, so a group lies in one block.
- The output head (`calib.HEAD_PATHS`): an untied `lm_head/kernel` (D, V) is a linear layer like the others, its
  Hessian that of the final-normed hidden states, computed after every block is quantized (`calib.walk`'s
  `head`); a tied `embed/embedding` (V, D) is quantized as the head kernel E.T it is, with a row layout
  (`granularity="row"` or `"row-group"`: a scale per token, or per group along D), once for both of its uses
  (the blocks were calibrated on the unquantized embedding's inputs).
- Weights that are exactly zero on entry (pruned by an earlier transform in a chain) are held at the zero code
  and their error is propagated like any other, so pruning masks survive (SparseGPT-style joint compensation);
  a float-minimum grid has no zero code, so there they are quantized like any other weight.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from research import errors
from research.compress import calib, core
from research.compress import hessian as hessian_lib
from research.compress.quant import grid as qgrid
from research.compress.quant import rtn as rtn_lib

_HIGHEST = jax.lax.Precision.HIGHEST
GROUP_FITS = ("block", "sweep", "static")


@functools.partial(jax.jit, static_argnames=("bs", "g", "grid", "fit_at_block"))
def _sweep(w, u, s_all, z_all, valid, bs: int, g: int, grid: qgrid.Grid, fit_at_block: bool):
    """The blocked GPTQ sweep.

    Args:
      w: (out, in) weights, `in` a multiple of bs.
      u: (in, in) upper Cholesky factor of H^-1.
      s_all, z_all: (out, in) scale and zero point of every weight (overwritten per group when g > 0).
      valid: (out, in) bool, False where the weight must stay exactly zero.
      bs: block size; g: dynamic group size (0: scales fixed), a divisor of bs.
      grid: the grid (for group fits).
      fit_at_block: fit a group on the weights as of the start of its block (the reference), not as updated.

    Returns:
      (out, in) float codes, and the (out, in) scales and zero points used.
    """
    dout, din = w.shape
    channel = dataclasses.replace(grid, granularity="channel")

    def block(b, carry):
        w, codes, s_all, z_all = carry
        i1 = b * bs
        w1 = jax.lax.dynamic_slice(w, (0, i1), (dout, bs))  # (out, bs)
        u1 = jax.lax.dynamic_slice(u, (i1, i1), (bs, bs))
        s1 = jax.lax.dynamic_slice(s_all, (0, i1), (dout, bs))
        z1 = jax.lax.dynamic_slice(z_all, (0, i1), (dout, bs))
        v1 = jax.lax.dynamic_slice(valid, (0, i1), (dout, bs))

        w_start = w1  # the block as it stands before its own columns update it

        def column(i, c):
            w1, s1, z1, q1, err1 = c
            if g:

                def refit(sz):
                    src = w_start if fit_at_block else w1
                    part = jax.lax.dynamic_slice(src, (0, i), (dout, g))  # (out, g)
                    s, z = qgrid.fit(part.T, channel)  # (out,) each
                    return tuple(
                        jax.lax.dynamic_update_slice(a, jnp.repeat(v[:, None], g, 1), (0, i))
                        for a, v in zip(sz, (s, z))
                    )

                s1, z1 = jax.lax.cond(i % g == 0, refit, lambda sz: sz, (s1, z1))
            col = w1[:, i]
            code = qgrid.to_codes(col, s1[:, i], z1[:, i], grid)
            if grid.zero == "integer":
                code = jnp.where(v1[:, i], code, z1[:, i])  # pruned: the zero code
            q = qgrid.from_codes(code, s1[:, i], z1[:, i], grid)
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
    group_fit: str = "block",
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
      group_fit: when group scales are fitted: "block", "sweep" or "static" (see the module docstring).
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
    dynamic = grid.granularity == "group" and not act_order and group_fit != "static"
    g = grid.group_size if dynamic else 0
    bs = max(g, blocksize // g * g) if g else min(blocksize, din)
    # Scales fixed before the sweep: whole-weight fits, or act-order's static groups; per weight, (in, out).
    s0, z0 = qgrid.fit(kernel, grid)
    s_full = jnp.broadcast_to(grid.layout.expand(s0, kernel.shape), kernel.shape)
    z_full = jnp.broadcast_to(grid.layout.expand(z0, kernel.shape), kernel.shape)
    perm = jnp.argsort(-jnp.diag(h), stable=True) if act_order else jnp.arange(din)
    h = h[perm][:, perm]
    u = hessian_lib.inverse_factor(h, float(percdamp), name, "gptq")
    pad = -din % bs
    w, s_all, z_all, v = (jnp.pad(a[perm].T, ((0, 0), (0, pad))) for a in (kernel, s_full, z_full, valid))
    # A shorter last group is fitted on its own columns: the padding repeats the last one (its error goes nowhere).
    w = jnp.pad(kernel[perm].T, ((0, 0), (0, pad)), mode="edge")
    s_all = s_all.at[:, din:].set(1.0)
    u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag((jnp.arange(din + pad) >= din).astype(jnp.float32))
    codes, s_all, z_all = _sweep(w, u, s_all, z_all, v, bs, g, grid, group_fit == "block")
    inv = jnp.argsort(perm)
    codes, s_all, z_all = (a[:, :din].T[inv] for a in (codes, s_all, z_all))  # (in, out), original order
    if not bool(jnp.all(jnp.isfinite(s_all))):
        raise errors.UserError(f"gptq: the quantization of {name} is not finite; raise percdamp")
    if grid.granularity == "group":
        scale, zero = s_all[:: grid.group_size], z_all[:: grid.group_size]  # (in // g, out)
    else:
        scale, zero = s0, z0
    return codes.astype(jnp.uint8), scale, zero.astype(jnp.float32 if grid.zero == "float" else jnp.uint8)


def gptq(
    bits: int = 4,
    *,
    where: str = core.BLOCK_KERNELS,
    symmetric: bool = False,
    granularity: str = "channel",
    group_size: int = 128,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    group_fit: str = "block",
    zero: str = "integer",
    sym_scale: str = "full",
    param_dtype: str = "float32",
    gguf: str | None = None,
) -> core.Transform:
    """GPTQ weight quantization, computed from calibration data in init.

    Args:
      bits, symmetric, granularity, group_size, zero, sym_scale, param_dtype: the grid (see `grid.Grid`);
        asymmetric with an integer zero point by default, as the reference scripts.
      gguf: a GGUF block type ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0"): the grid becomes that type's exact
        parametrisation (groups of 32, float16 scales; `grid.for_gguf`), so a GGUF export writes these codes as
        they are.
      where: path regex of the kernels to quantize (linear kernels inside the blocks, and the output head: an
        untied "lm_head/kernel", or a tied "embed/embedding" with a row granularity).
      blocksize: columns per lazy-update block.
      percdamp: damping of the Hessian's diagonal, as a fraction of its mean.
      act_order: quantize inputs in order of decreasing diag(H).
      group_fit: when group scales are fitted: "block" (the reference), "sweep" or "static".

    Returns:
      A Transform with RTN's state format ({"codes", "scale", "zero"}); apply dequantizes.
    """
    grid = qgrid.Grid(bits, symmetric, granularity, group_size, zero, sym_scale, param_dtype)
    grid = qgrid.for_gguf(gguf, grid, qgrid.Grid(4, False, "channel", 128))
    core.check_pattern(where)
    if group_fit not in GROUP_FITS:
        raise errors.UserError(f"gptq group_fit must be one of {GROUP_FITS}, got {group_fit!r}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise errors.UserError(f"gptq blocksize must be a positive integer, got {blocksize!r}")
    if not isinstance(percdamp, int | float) or isinstance(percdamp, bool) or not 0 <= percdamp < 1:
        raise errors.UserError(f"gptq percdamp must be in [0, 1), got {percdamp!r}")

    def init(params, key, calib_data):
        calib_data = calib.require(calib_data, "gptq")
        paths = core.select(params, where)
        flat = core.touched(params)
        heads = [p for p in paths if p in calib.HEAD_PATHS]
        for p in paths:
            _check_head(p, grid, tied="lm_head/kernel" not in flat)
            qgrid.check_shape(flat[p].shape, grid, p)
            qgrid.check_finite(flat[p], p)
        leaves = {}

        def quantize(path, kernel, hessian, grid):
            return quantize_layer(
                kernel,
                hessian,
                grid,
                blocksize=blocksize,
                percdamp=percdamp,
                act_order=act_order,
                group_fit=group_fit,
                name=path,
            )

        def visit(i, stats, n_tokens, kernels):
            out = {}
            for name, k in kernels.items():
                path = f"layers/{i}/{name}/kernel"
                c, s, z = quantize(path, k, stats[name], grid)
                leaves[path] = (c, s, z)
                out[name] = qgrid.dequantize(c, s, z, grid).astype(k.dtype)
            return out

        def head(hessian, n_tokens):
            for p in heads:
                if grid.layout.transposed:  # a tied embedding (V, D): the head kernel E.T (D, V), per token
                    columns = dataclasses.replace(grid, granularity=grid.layout.columns.granularity)
                    c, s, z = quantize(p, flat[p].T, hessian, columns)
                    leaves[p] = (c.T, s, z)
                else:
                    leaves[p] = quantize(p, flat[p], hessian, grid)

        calib.walk(
            calib_data,
            params,
            paths,
            visit,
            stat="hessian",
            desc="gptq",
            head=head if heads else None,
            records=(leaves,),
        )
        return rtn_lib.codes_state(params, leaves, grid)

    return core.Transform(init, rtn_lib.dequantizer(grid), export=rtn_lib.exporter(grid))


def _check_head(path: str, grid: qgrid.Grid, tied: bool) -> None:
    """UserError when `grid`'s layout cannot be GPTQ's for `path` (row layouts are the tied embedding's only)."""
    if path == "embed/embedding":
        if not tied:
            raise errors.UserError(
                "gptq: embed/embedding of an untied model is only a lookup table (no Hessian); quantize it with "
                "rtn, qat or codebook"
            )
        if not grid.layout.transposed:
            raise errors.UserError(
                "gptq quantizes the tied embed/embedding (V, D) as the head kernel it is: use granularity='row' (a "
                "scale per token) or 'row-group' (groups along D)"
            )
    elif grid.layout.transposed:
        raise errors.UserError(
            f"gptq: granularity {grid.granularity!r} is for the tied embedding table; {path} is a kernel (use "
            "'channel' or 'group')"
        )
