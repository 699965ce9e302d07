"""Weight sharing through codebooks (Deep Compression): each selected kernel becomes indices into a few centroids.

    t = codebook(4, granularity="channel")       # 16 centroids per output column
    state = t.init(params, key, None)
    effective = t.apply(params, state)            # codebook[indices], exact zeros where pruned

State: a dict of three trees, each mirroring params with None at untouched leaves:
  "codebook": float32 (P, k) per leaf, sorted centroids of P independent problems;
  "indices":  uint8 of the kernel's shape, the centroid of every weight (0 at pruned weights);
  "keep":     bool of the kernel's shape, False where the weight was exactly 0.0 at init (pruned by an earlier
              transform in `core.chain`). Pruned weights take no centroid and stay exactly 0.0; `masks` returns
              this tree, so `core.keep_masked` also holds the raw weights there at zero.

Problems (P) by granularity, for a kernel (in, out):
  "tensor":  P = 1, the whole leaf (any shape);
  "channel": P = out, row o holds column kernel[:, o];
  "group":   P = out * in // group_size, row o * (in // group_size) + j holds kernel[j*g:(j+1)*g, o];
  "row", "row-group": the same of a 2-D table's transpose (an embedding (V, D): a codebook per token, or per g
             consecutive entries of a token's row; `research.codes`).

Gradients (trained=True): apply is `codebook[indices] + (params - stop_gradient(params))`, so the train step's
gradient w.r.t. a raw weight is dL/d(its effective weight), and its gradient w.r.t. the codebook (the trained state,
differentiated by the train step like LSQ's scales) is, through the gather, the sum of those over the kept weights
sharing each centroid; `learn` takes a plain SGD step of `lr` on the codebook, indices fixed, as Deep Compression
does. Entries rounded to their storage type pass the gradient straight through. With `reassign_every=n`, every n-th
step's `update` also re-assigns each kept weight to the centroid nearest its raw (straight-through trained) value.
trained=False: the codebook is static and no gradient reaches the raw weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from research import codes, errors
from research.compress import calib as calib_lib
from research.compress import core
from research.compress.share import kmeans

GRANULARITIES = codes.GRANULARITIES
ENTRY_DTYPES = ("float32", "float16", "bfloat16", "int8")
WEIGHTINGS = ("none", "fisher")


def _check_leaf(path, w, granularity, group_size):
    if granularity in ("row", "row-group"):
        if w.ndim != 2:
            raise errors.UserError(f"{granularity} codebooks need a 2-D table (rows, cols); {path} has shape {w.shape}")
        if granularity == "row-group" and w.shape[1] % group_size:
            raise errors.UserError(f"group_size {group_size} must divide the row length {w.shape[1]} of {path}")
    elif granularity != "tensor" and w.ndim < 2:
        raise errors.UserError(f"{granularity} codebooks need a kernel (in, out); {path} has shape {w.shape}")
    if granularity == "group":
        n_in = w.size // w.shape[-1]
        if n_in % group_size:
            raise errors.UserError(
                f"group_size {group_size} must divide the input dimension {n_in} of {path} {w.shape}"
            )
    if not bool(jnp.all(jnp.isfinite(w))):
        raise errors.UserError(f"{path} has NaN or inf weights: they cannot be shared through a codebook")


def codebook(
    bits: int = 4,
    *,
    where: str = core.BLOCK_KERNELS,
    granularity: str = "tensor",
    group_size: int = 128,
    init: str = "linear",
    iters: int = 300,
    trained: bool = True,
    lr: float = 1e-4,
    reassign_every: int | None = None,
    entry_dtype: str = "float32",
    weighting: str = "none",
) -> core.Transform:
    """Weight sharing: k = 2**bits centroids per tensor, output channel or group, fitted by weighted k-means.

    Args:
      bits: index width, 1..8 (k = 2**bits centroids).
      where: path regex of the leaves to share.
      granularity: "tensor", "channel" (per output column), "group" (groups along the input dim of a column),
        "row" (per row of a 2-D table: an embedding's tokens) or "row-group" (groups along each row).
      group_size: the group length for granularity="group"; must divide the input dimension.
      init: k-means initialisation, one of `kmeans.INITS` ("linear" is Deep Compression's best).
      iters: at most this many Lloyd iterations (they stop once no centroid moves).
      trained: fine-tune the centroids with the summed gradients of their weights (else static).
      lr: SGD learning rate of the centroids.
      reassign_every: re-assign weights to the nearest centroid every this many steps (None: never).
      entry_dtype: how the codebook entries are stored ("float32", "float16", "bfloat16", or "int8": a symmetric
        8-bit grid per codebook, scale = max|entry| / 127; Deep Compression's "quantize the codebook"): the forward
        pass uses the entries rounded to it, while the state keeps float32 entries so that training can move them
        by less than the rounding step.
      weighting: "none", or "fisher": weighted k-means with each weight's diagonal Fisher information from the
        calibration data (`calib.fisher`) as its weight, as SqueezeLLM does; needs calibration data.

    Returns:
      A `core.Transform`; see the module docstring for its state, gradients and masks.
    """
    k = kmeans.entries(bits)
    kmeans.check_init(init)
    if granularity not in GRANULARITIES:
        raise errors.UserError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise errors.UserError(f"group_size must be a positive integer, got {group_size!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise errors.UserError(f"iters must be a non-negative integer, got {iters!r}")
    if weighting not in WEIGHTINGS:
        raise errors.UserError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if entry_dtype not in ENTRY_DTYPES:
        raise errors.UserError(f"entry_dtype must be one of {ENTRY_DTYPES}, got {entry_dtype!r}")
    if reassign_every is not None and (not isinstance(reassign_every, int) or reassign_every < 1):
        raise errors.UserError(f"reassign_every must be a positive integer or None, got {reassign_every!r}")

    lay = codes.Layout.of(granularity, group_size)

    def init_fn(params, key, calib):
        flat = core.touched(params)
        books, idxs, keeps = {}, {}, {}
        sens = None
        if weighting == "fisher":
            sens = core.touched(calib_lib.fisher(calib_lib.require(calib, "codebook with weighting='fisher'"), params))
        for i, path in enumerate(core.select(params, where)):
            w = flat[path]
            _check_leaf(path, w, granularity, group_size)
            keep = w != 0
            weights = None
            if sens is not None:  # normalised per leaf; a small floor keeps every problem's total weight positive
                f = sens[path] / jnp.maximum(jnp.mean(sens[path]), 1e-30)
                weights = lay.to_problems(f + 1e-6)
            cb, idx, _ = kmeans.fit(
                lay.to_problems(w),
                k,
                weights=weights,
                valid=lay.to_problems(keep),
                init=init,
                iters=iters,
                key=jax.random.fold_in(key, i),
            )
            books[path], idxs[path], keeps[path] = cb, lay.from_problems(idx, w.shape), keep
        return shared_state(params, books, idxs, keeps)

    def values(idx, table, keep):
        return codes.palette_values(idx, table, lay, keep)

    apply, learn = shared(values, entry_dtype, trained, lr)

    def update(params, state, grads, step):
        def reassign():
            def one(cb, p, keep):
                idx = jax.vmap(kmeans.assign)(cb, lay.to_problems(p.astype(jnp.float32)))
                return jnp.where(keep, lay.from_problems(idx, p.shape), 0).astype(jnp.uint8)

            moved = core.map_touched(one, state["codebook"], params, state["keep"])
            return jax.tree.map(lambda m, s: None if s is None else m, moved, state["codebook"], is_leaf=_none)

        indices = jax.lax.cond(step % reassign_every == 0, reassign, lambda: state["indices"])
        return dict(state, indices=indices)

    def export(params, state):
        books, idxs, keeps = (core.touched(state[k]) for k in ("codebook", "indices", "keep"))
        # apply's straight-through term adds (p - p) = +0.0, which turns an entry of -0.0 into +0.0
        tables = {p: stored_entries(cb, entry_dtype) + (0.0 if trained else -0.0) for p, cb in books.items()}
        return {p: codes.Palette(idxs[p], tables[p], lay, keeps[p]) for p in books}

    reassigns = dict(update=update) if trained and reassign_every is not None else {}
    return core.Transform(
        init_fn, apply, masks=lambda state: state["keep"], learn=learn if trained else None, export=export, **reassigns
    )


def _none(x):
    return x is None


def shared_state(params, books: dict, idxs: dict, keeps: dict) -> dict:
    """The state of a shared-weight method ({"codebook", "indices", "keep"}, trees mirroring params) from
    {path: array} dicts."""
    return {
        "codebook": core.touched_tree(params, books),
        "indices": core.touched_tree(params, idxs),
        "keep": core.touched_tree(params, keeps),
    }


def shared(values, entry_dtype: str, trained: bool, lr: float, stored=None):
    """(apply, learn) of a shared-weight state: the effective leaf is values(indices, entries, keep), the entries
    rounded to their storage type (`stored`, default `stored_entries`); trained, the gradient reaches the float32
    entries straight through the rounding and the raw weights through a (p - stop_gradient(p)) term, and `learn`
    takes an SGD step of `lr` on the entries (the module docstring's gradients; `vq` shares them)."""
    stored = stored or stored_entries

    def entries(cb):
        if trained:
            return core.straight_through(lambda c: stored(c, entry_dtype), cb)
        return stored(cb, entry_dtype)

    def apply(params, state):
        def one(cb, p, idx, keep):
            w = values(idx, entries(cb), keep).astype(p.dtype)
            return w + jnp.where(keep, p - jax.lax.stop_gradient(p), 0) if trained else w

        return core.map_touched(one, state["codebook"], params, state["indices"], state["keep"])

    def learn(state, grads, step):
        books = jax.tree.map(lambda cb, g: cb - lr * g, state["codebook"], grads["codebook"])
        return dict(state, codebook=books)

    return apply, learn


def stored_entries(cb, entry_dtype: str):
    """The codebook entries (P, k) as stored: rounded to `entry_dtype`, or for "int8" to the codes round(c / s)
    with one scale s = max|c| / 127 per codebook (a codebook of zeros keeps s = 1). Returns float32 (P, k)."""
    cb = cb.astype(jnp.float32)
    if entry_dtype != "int8":
        return cb.astype(entry_dtype).astype(jnp.float32)
    amax = jnp.max(jnp.abs(cb), axis=1, keepdims=True)  # (P, 1)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    return jnp.clip(jnp.round(cb / scale), -127, 127) * scale
