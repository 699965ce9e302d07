"""SparseGPT (Frantar & Alistarh 2023, "Massive Language Models Can Be Accurately Pruned in One-Shot"): layer-wise
optimal brain surgeon with lazy blocked updates.

For each linear layer with calibration inputs X (tokens, in), SparseGPT minimises ||X W - X W'||_F over sparse W'
column by column (one input feature at a time, in the reference's (out, in) layout): it prunes, then spreads the
pruning error of input j over the inputs not yet visited through the upper Cholesky factor of H^-1, H = X^T X.
The mask is chosen adaptively: at the start of every block of `blocksize` inputs (unstructured), or of every M
inputs ("N:M"), from the current (already updated) weights with the OBS score w^2 / [H^-1]_jj^2 (the squared
diagonal of the Cholesky factor). Blocks of the model are pruned in order, each calibrated on the outputs of the
already-pruned blocks, as in the reference code (IST-DASLab/sparsegpt).

Because the surviving weights change, the transform's state carries the change: {"masks": ..., "delta": ...} with
delta = reconstructed - original (zero at pruned weights), and `apply` gives (params + delta) at kept weights, 0
elsewhere. Fine-tuning trains params; delta stays fixed.

Differences from the reference: "N:M" keeps N of every M (as everywhere in `masks`; the reference's prunen counts
the pruned weights; the two agree for 2:4 and 4:8); unstructured blocks prune exactly round(sparsity * size)
weights (the reference prunes every weight at or below the threshold, one more); a Hessian that is not positive
definite after dampening is retried with 10x the damping (3 times) before failing with a UserError.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from research import errors
from research.compress import calib, core
from research.compress import hessian as hessian_lib
from research.compress.prune import masks

_HIGHEST = jax.lax.Precision.HIGHEST


@functools.partial(jax.jit, static_argnames=("bs", "nm"))
def _solve(w, u, n_prune, valid, bs: int, nm):
    """The blocked OBS sweep over the inputs.

    Args:
      w: (out, in) weights, in a multiple of bs.
      u: (in, in) upper Cholesky factor of H^-1.
      n_prune: (in // bs,) int32 weights to prune in each block (unstructured).
      valid: (in,) bool, False at padding inputs (never pruned, always zero).
      bs: block size.
      nm: (N, M) or None.

    Returns:
      (out, in) reconstructed weights (zero where pruned) and (out, in) bool keep mask.
    """
    dout, din = w.shape
    d_all = jnp.diag(u)  # (in,)

    def block(b, carry):
        w, keep = carry
        i1 = b * bs
        w1 = jax.lax.dynamic_slice(w, (0, i1), (dout, bs))  # (out, bs)
        u1 = jax.lax.dynamic_slice(u, (i1, i1), (bs, bs))  # (bs, bs)
        d = jax.lax.dynamic_slice(d_all, (i1,), (bs,))  # (bs,)
        if nm is None:
            s = jnp.where(jax.lax.dynamic_slice(valid, (i1,), (bs,)), w1**2 / d**2, jnp.inf)  # (out, bs)
            k1 = masks.keep_top(s.reshape(-1), dout * bs - n_prune[b]).reshape(dout, bs)
        else:
            k1 = jnp.ones((dout, bs), bool)

        def column(i, c):
            w1, k1, err1 = c
            if nm is not None:
                n, m = nm

                def pick(k1):
                    g = jax.lax.dynamic_slice(w1, (0, i), (dout, m))  # (out, M)
                    dg = jax.lax.dynamic_slice(d, (i,), (m,))
                    return jax.lax.dynamic_update_slice(k1, masks.keep_top(g**2 / dg**2, n), (0, i))

                k1 = jax.lax.cond(i % m == 0, pick, lambda k: k, k1)
            e = jnp.where(k1[:, i], 0.0, w1[:, i]) / d[i]  # (out,) pruning error over the pivot
            w1 = w1 - e[:, None] * u1[i][None, :]  # u1 is upper triangular: columns before i are untouched
            return w1, k1, err1.at[:, i].set(e)

        w1, k1, err1 = jax.lax.fori_loop(0, bs, column, (w1, k1, jnp.zeros_like(w1)))
        rows = jax.lax.dynamic_slice(u, (i1, 0), (bs, din))  # (bs, in), zero before i1
        w = w - jnp.dot(err1, rows, precision=_HIGHEST)
        w = jax.lax.dynamic_update_slice(w, jnp.where(k1, w1, 0.0), (0, i1))
        return w, jax.lax.dynamic_update_slice(keep, k1, (0, i1))

    return jax.lax.fori_loop(0, din // bs, block, (w, jnp.ones_like(w, bool)))


@functools.partial(jax.jit, static_argnames=("bs", "nm"))
def _prune(kernel, h, u, n_prune, bs: int, nm):
    """`_solve` on a kernel (in, out): zeroes dead inputs, pads the inputs to a multiple of bs, undoes both."""
    din = kernel.shape[0]
    pad = -din % bs
    w = jnp.where(jnp.diag(h)[None, :] == 0, 0.0, kernel.astype(jnp.float32).T)  # (out, in)
    w = jnp.pad(w, ((0, 0), (0, pad)))
    u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag((jnp.arange(din + pad) >= din).astype(jnp.float32))
    new, keep = _solve(w, u, n_prune, jnp.arange(din + pad) < din, bs, nm)
    return new[:, :din].T.astype(kernel.dtype), keep[:, :din].T


def _check_options(blocksize, percdamp) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0:
        raise errors.UserError(f"sparsegpt blocksize must be a positive integer, got {blocksize!r}")
    if isinstance(percdamp, bool) or not isinstance(percdamp, int | float) or not percdamp >= 0:
        raise errors.UserError(f"sparsegpt percdamp must be a non-negative number, got {percdamp!r}")


def prune_layer(kernel, hessian, sparsity, pattern=None, blocksize: int = 128, percdamp: float = 0.01, name="layer"):
    """Prunes one linear layer by SparseGPT's OBS reconstruction.

    Args:
      kernel: (in, out) weights.
      hessian: (in, in) X^T X of the layer's calibration inputs (any positive scale).
      sparsity: fraction to prune, in [0, 1) (ignored with a pattern).
      pattern: "N:M" to keep N of every M consecutive inputs of each output.
      blocksize: inputs per lazy-update block (and per mask-selection block when unstructured); with "N:M" it is
        rounded down to a multiple of M.
      percdamp: damping added to the diagonal, as a fraction of its mean.
      name: the layer's name in warnings and errors.

    Returns:
      (in, out) reconstructed kernel (kernel's dtype, zero where pruned) and (in, out) bool keep mask.

    Raises:
      UserError: bad options, shapes that do not fit the pattern, a Hessian that stays indefinite, or non-finite
        output.
    """
    sparsity = masks.check_sparsity(sparsity)
    nm = masks.parse_pattern(pattern)
    _check_options(blocksize, percdamp)
    din, dout = kernel.shape
    if hessian.shape != (din, din):
        raise errors.UserError(f"sparsegpt: {name} has {din} inputs but its Hessian is {hessian.shape}")
    if nm is not None:
        masks.check_divides(kernel.shape, nm[1], name)
    h = jnp.asarray(hessian, jnp.float32)
    if not bool(jnp.all(jnp.isfinite(h))):
        raise errors.UserError(f"sparsegpt: the Hessian of {name} has NaN/inf entries; check the calibration inputs")
    u = hessian_lib.inverse_factor(h, float(percdamp), name, "sparsegpt")
    bs = min(blocksize, din)
    if nm is not None:
        bs = max(nm[1], bs - bs % nm[1])  # groups of M never straddle two blocks
    counts = np.minimum(bs, din - bs * np.arange(-(-din // bs)))  # valid inputs per block
    n_prune = jnp.asarray([masks.n_pruned(sparsity, int(c) * dout) for c in counts], jnp.int32)
    new, keep = _prune(jnp.asarray(kernel), h, u, n_prune, bs, nm)
    if not bool(jnp.all(jnp.isfinite(new))):
        raise errors.UserError(f"sparsegpt: the reconstruction of {name} is not finite; raise percdamp")
    return new, keep


def sparsegpt(
    sparsity: float = 0.5,
    *,
    where: str = core.BLOCK_KERNELS,
    pattern: str | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> core.Transform:
    """SparseGPT pruning with weight reconstruction, computed from calibration data in init.

    Args:
      sparsity: fraction of each selected kernel to remove, in [0, 1).
      where: path regex of the kernels to prune (linear kernels inside the blocks).
      pattern: "N:M" for semi-structured sparsity (e.g. "2:4"), overriding sparsity.
      blocksize: inputs per lazy-update and mask-selection block.
      percdamp: damping of the Hessian's diagonal, as a fraction of its mean.

    Returns:
      A Transform with state {"masks": bool mask tree, "delta": tree of reconstructed - original kernels (zero at
      pruned weights)}, None at untouched leaves; apply gives (params + delta) where kept and 0 where pruned.
    """
    sparsity = masks.check_sparsity(sparsity)
    nm = masks.parse_pattern(pattern)
    _check_options(blocksize, percdamp)

    def init(params, key, calib_data):
        calib_data = calib.require(calib_data, "sparsegpt")
        paths = core.select(params, where)
        if nm is not None:
            flat = core.touched(params)
            for p in paths:
                masks.check_divides(flat[p].shape, nm[1], p)
        found, deltas = {}, {}

        def visit(i, stats, n_tokens, kernels):
            out = {}
            for name, k in kernels.items():
                path = f"layers/{i}/{name}/kernel"
                out[name], found[path] = prune_layer(k, stats[name], sparsity, pattern, blocksize, percdamp, path)
                deltas[path] = jnp.where(found[path], out[name] - k, jnp.zeros((), k.dtype))
            return out

        calib.walk(calib_data, params, paths, visit, stat="hessian", desc="sparsegpt", records=(found, deltas))
        return {"masks": core.touched_tree(params, found), "delta": core.touched_tree(params, deltas)}

    def apply(params, state):
        return core.map_touched(
            lambda m, p, d: jnp.where(m, p + d.astype(p.dtype), jnp.zeros((), p.dtype)),
            state["masks"],
            params,
            state["delta"],
        )

    return core.Transform(init, apply, masks=lambda state: state["masks"])
