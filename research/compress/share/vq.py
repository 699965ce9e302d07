"""Vector quantization (VQ): each selected kernel becomes indices into a codebook of d-vectors, optionally summed over
residual stages (RVQ, the additive form of AQLM's codebooks).

    t = vq(8, dim=4)                             # 256 4-vectors per tensor: 8 / 4 = 2 bits per weight + the table
    state = t.init(params, key, None)
    effective = t.apply(params, state)            # sum of the stages' entries per vector, exact zeros where pruned

Vectors are d consecutive *inputs* of one output column, kernel[j*d:(j+1)*d, o] (the direction a matmul reads
them), or under granularity "row" d consecutive entries of a row of a 2-D table (an embedding (V, D): a token's
features). The input dimension (the row length) must be a multiple of d. Problems (P), each with its own codebook:
"tensor" one for the leaf, "channel" one per output column (last axis), "row" one per row (`research.codes`).

State: a dict of three trees, each mirroring params with None at untouched leaves:
  "codebook": float32 (S, P, k, d) per leaf: stage s's k = 2**bits entries of each problem;
  "indices":  uint8 (bits <= 8) or uint16, (S, *grid): every vector's entry per stage; the grid is the leaf with
              the vectors' axis divided by d, (in / d, *out) or (rows, cols / d) (`codes.vector_grid`);
  "keep":     bool of the kernel's shape, False where the weight was exactly 0.0 at init (pruned by an earlier
              member of `core.chain`): it stays exactly 0.0 whatever its vector's entry, takes no part in the fit
              (a zero weight per coordinate in the k-means), and `masks` returns this tree for `core.keep_masked`.

Fit (`vkmeans`): stage 1 is weighted vector k-means (k-means++ init by default, Lloyd, empty clusters relocated) of
the vectors, stage s > 1 of the residual the earlier stages leave (with their entries rounded to `entry_dtype`),
so every stage can only lower the error. With weighting="fisher" each coordinate's weight is its diagonal Fisher
from calibration data, as `codebook` (SqueezeLLM). This is greedy residual VQ: AQLM's joint beam search over the
stages' codes and its alternating codebook updates are not done.

Gradients (trained=True), as `codebook`: apply is `codes.vector_values(indices, codebook)` plus
(params - stop_gradient(params)), so a raw weight's gradient is dL/d(its effective weight), and an entry's gradient
(the trained state, differentiated by the train step) is, through the gather, the sum of the gradients of the kept
effective weights of the vectors using it, coordinate by coordinate; `learn` takes an SGD step of `lr` on the
entries, indices fixed. Entries rounded to `entry_dtype` in the forward pass pass the gradient straight through; the
state keeps float32.

Size: a leaf of N weights costs S * (N / d) indices of `bits` (entropy-coded, so at most bits / d per weight and
stage) plus the tables, S * P * k * d entries of 16 bits in float16 / bfloat16: vq(8, dim=4) on a 256 x 256 kernel is
2 bits per weight + 0.25 for its table; vq(4, dim=2) 2 bits + ~0.001.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from research import codes, errors
from research.compress import calib as calib_lib
from research.compress import core
from research.compress.share import codebook, vkmeans

log = logging.getLogger(__name__)

GRANULARITIES = codes.VECTOR_GRANULARITIES
ENTRY_DTYPES = ("float32", "float16", "bfloat16")
WEIGHTINGS = ("none", "fisher")
MAX_BITS, MAX_DIM, MAX_STAGES = 12, 8, 8


def _int_in(name, x, lo, hi):
    if isinstance(x, bool) or not isinstance(x, int) or not lo <= x <= hi:
        raise errors.UserError(f"vq {name} must be an integer in {lo}..{hi}, got {x!r}")
    return x


def _check_leaf(path, w, lay: codes.Layout, dim: int):
    if lay.transposed and w.ndim != 2:
        raise errors.UserError(f"row vectors need a 2-D table (rows, cols); {path} has shape {w.shape}")
    if lay.granularity == "channel" and w.ndim < 2:
        raise errors.UserError(f"channel codebooks need a kernel (in, out); {path} has shape {w.shape}")
    axis, what = (1, "row length") if lay.transposed else (0, "input dimension")
    if w.ndim == 0 or w.shape[axis] % dim:
        raise errors.UserError(
            f"vq dim {dim} must divide the {what} of {path} {tuple(w.shape)}: choose a dim that divides "
            f"{w.shape[axis] if w.ndim else 1}, or leave the leaf out of `where`"
        )
    if not bool(jnp.all(jnp.isfinite(w))):
        raise errors.UserError(f"{path} has NaN or inf weights: they cannot be vector-quantized")


def stored_entries(cb, entry_dtype: str):
    """The entries as the forward pass uses them: rounded to `entry_dtype`, as float32."""
    return cb.astype(jnp.float32).astype(entry_dtype).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("k", "stages", "entry_dtype", "init", "iters"))
def fit_stages(x, weights, key, *, k: int, stages: int, entry_dtype: str, init: str, iters: int):
    """Residual VQ of P problems of vectors x (P, n, d) with per-coordinate weights (P, n, d), 0.0 where x is
    left out (`vkmeans.lloyd`).

    Returns (codebooks (S, P, k, d) float32, indices (S, P, n) int32, errors: the weighted squared error of the
    reconstruction after each stage, (S, P) float32, with the entries rounded to `entry_dtype`).
    """
    books, idxs, errs = [], [], []
    acc = jnp.zeros_like(x)
    rows = jnp.arange(x.shape[0])[:, None]
    for s in range(stages):
        r = jnp.where(weights > 0, x - acc, 0.0)
        cb, idx, _ = vkmeans.lloyd(r, weights, jax.random.fold_in(key, s), k=k, init=init, iters=iters)
        acc = acc + stored_entries(cb, entry_dtype)[rows, idx]  # summed in stage order, as `codes.vector_values`
        books.append(cb)
        idxs.append(idx)
        errs.append(jnp.sum(weights * (x - acc) ** 2, axis=(1, 2)))
    return jnp.stack(books), jnp.stack(idxs), jnp.stack(errs)


@functools.partial(jax.jit, static_argnames=("lay", "dim", "k", "stages", "entry_dtype", "init", "iters"))
def _fit_leaf(w, sens, key, *, lay, dim, k, stages, entry_dtype, init, iters):
    """(codebook (S, P, k, d), indices (S, *grid) int32, keep) of one leaf; `sens` its Fisher, or None."""
    keep = w != 0
    weights = keep.astype(jnp.float32)
    if sens is not None:  # normalised per leaf; a small floor keeps every kept weight in the fit
        weights = weights * (sens / jnp.maximum(jnp.mean(sens), 1e-30) + 1e-6)
    x = codes.to_vectors(jnp.where(keep, w, 0).astype(jnp.float32), lay, dim)
    cb, idx, _ = fit_stages(
        x, codes.to_vectors(weights, lay, dim), key, k=k, stages=stages, entry_dtype=entry_dtype, init=init, iters=iters
    )
    grid = codes.vector_grid(w.shape, lay, dim)
    return cb, jnp.stack([lay.from_problems(idx[s], grid) for s in range(stages)]), keep


def vq(
    bits: int = 8,
    *,
    dim: int = 4,
    where: str = core.BLOCK_KERNELS,
    granularity: str = "tensor",
    stages: int = 1,
    iters: int = 100,
    init: str = "kmeans++",
    trained: bool = True,
    lr: float = 1e-4,
    entry_dtype: str = "float16",
    weighting: str = "none",
) -> core.Transform:
    """Vector quantization: k = 2**bits d-vectors per tensor, output column or row, summed over `stages`.

    Args:
      bits: index width per stage, 1..12 (k = 2**bits entries; uint16 indices above 8).
      dim: d, the weights per vector, 1..8 (1 is scalar k-means); must divide the input dimension (row length).
      where: path regex of the leaves to quantize.
      granularity: "tensor" (one codebook per leaf), "channel" (one per output column) or "row" (one per row of a
        2-D table, vectors along the row).
      stages: residual stages, 1..8 (value = the sum of one entry per stage; S * bits / d bits per weight).
      iters: at most this many Lloyd iterations per stage (they stop once no entry moves).
      init: vector k-means initialisation, one of `vkmeans.INITS`.
      trained: fine-tune the entries with the summed gradients of their weights (else static).
      lr: SGD learning rate of the entries.
      entry_dtype: "float32", "float16" or "bfloat16": the entries the forward pass uses (and the packer stores)
        are rounded to it; the state keeps float32 so that training can move them by less than the rounding step.
      weighting: "none", or "fisher": each coordinate weighted by its diagonal Fisher information from calibration
        data (`calib.fisher`); needs calibration data.

    Returns:
      A `core.Transform`; see the module docstring for its state, gradients and masks.
    """
    k = 2 ** _int_in("bits", bits, 1, MAX_BITS)
    _int_in("dim", dim, 1, MAX_DIM)
    _int_in("stages", stages, 1, MAX_STAGES)
    vkmeans.check_init(init)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise errors.UserError(f"vq iters must be a non-negative integer, got {iters!r}")
    if granularity not in GRANULARITIES:
        raise errors.UserError(f"vq granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if weighting not in WEIGHTINGS:
        raise errors.UserError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if entry_dtype not in ENTRY_DTYPES:
        raise errors.UserError(f"entry_dtype must be one of {ENTRY_DTYPES}, got {entry_dtype!r}")
    lay = codes.Layout(granularity)
    index_dtype = jnp.uint8 if k <= 256 else jnp.uint16

    def init_fn(params, key, calib):
        flat = core.touched(params)
        books, idxs, keeps = {}, {}, {}
        sens = None
        if weighting == "fisher":
            sens = core.touched(calib_lib.fisher(calib_lib.require(calib, "vq with weighting='fisher'"), params))
        for i, path in enumerate(core.select(params, where)):
            w = flat[path]
            _check_leaf(path, w, lay, dim)
            per_problem = codes.vector_grid(w.shape, lay, dim)
            n = int(np.prod(per_problem)) // lay.n_problems(per_problem)
            if n < k:
                log.warning("vq: %s has %d vectors per codebook, fewer than its %d entries", path, n, k)
            cb, idx, keep = _fit_leaf(
                w,
                None if sens is None else sens[path],
                jax.random.fold_in(key, i),
                **dict(lay=lay, dim=dim, k=k, stages=stages, entry_dtype=entry_dtype, init=init, iters=iters),
            )
            books[path], idxs[path], keeps[path] = cb, idx.astype(index_dtype), keep
        return codebook.shared_state(params, books, idxs, keeps)

    apply, learn = codebook.shared(
        lambda idx, table, keep: codes.vector_values(idx, table, lay, keep), entry_dtype, trained, lr, stored_entries
    )

    def export(params, state):
        books, idxs, keeps = (core.touched(state[k]) for k in ("codebook", "indices", "keep"))
        out = {}
        for p, cb in books.items():
            table = np.array(stored_entries(cb, entry_dtype))
            if trained:  # apply's straight-through term adds (p - p) = +0.0, which turns a sum of -0.0 into +0.0;
                table[0] += np.float32(0.0)  # a first stage without -0.0 gives sums without it (NumPy: no folding)
            out[p] = codes.Vectors(idxs[p], table, lay, keeps[p])
        return out

    return core.Transform(
        init_fn, apply, masks=lambda state: state["keep"], learn=learn if trained else None, export=export
    )
