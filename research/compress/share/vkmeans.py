"""Vector k-means for vector quantization: Lloyd's algorithm in JAX over d-dimensional points, vectorised over
independent problems, with a weight per coordinate.

`fit` takes `values` of shape (P, n, d): P independent problems (one per tensor, output column or row) of n
d-vectors each. Optional `weights` (P, n, d) make the distance a diagonal weighted one, sum_j w_j (x_j - c_j)^2,
and each centroid coordinate the weighted mean of its cluster's coordinates (a diagonal Fisher gives SqueezeLLM's
sensitivity-weighted fit; a weight of 0 leaves a pruned coordinate out entirely). A vector whose weights are all
zero moves no centroid and gets index 0.

    codebooks, indices, inertia = vkmeans.fit(x, 256, key=key)   # (P, 256, d) f32, (P, n) int32, (P,) f32

Initialisation is k-means++ (the first centre uniformly among the vectors with any weight, then by weighted
squared distance) or "random" (k distinct vectors). Distances are computed directly (not as |x|^2 - 2 x.c + |c|^2,
which cancels badly in float32) in chunks of vectors, so memory stays ~chunk * k * d floats whatever n is.
Empty clusters are relocated to the vectors farthest from their centroids (the i-th empty cluster to the i-th
farthest, as scikit-learn does), and the iterations stop once no centroid moves (at most `iters`). Deterministic
given the key.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from research import errors

INITS = ("kmeans++", "random")
CHUNK_FLOATS = 1 << 22  # distances computed ~4M (vector, centroid, coordinate) terms at a time


def check_init(init: str) -> str:
    if init not in INITS:
        raise errors.UserError(f"vector k-means init must be one of {INITS}, got {init!r}")
    return init


def _wdist(x, w, c):
    """Weighted squared distances of vectors x (n, d) with weights w (n, d) to centroids c (k, d): (n, k).

    A sum over the d coordinates of (n, k) terms (d is small; the k axis innermost vectorises well on CPU)."""
    out = 0.0
    for j in range(x.shape[-1]):
        out = out + w[:, j, None] * (x[:, j, None] - c[None, :, j]) ** 2
    return out


def assign(codebooks, values, weights):
    """Nearest-centroid indices of P problems: codebooks (P, k, d), values and weights (P, n, d).

    Returns (indices (P, n) int32, their weighted squared distances (P, n) float32); ties go to the lower index.
    """
    n_problems, n, d = values.shape
    k = codebooks.shape[1]
    chunk = max(1, min(n, CHUNK_FLOATS // (k * d)))
    if chunk == n:  # small enough at once
        dist = jax.vmap(_wdist)(values, weights, codebooks)  # (P, n, k)
        idx = jnp.argmin(dist, axis=-1)
        return idx.astype(jnp.int32), jnp.take_along_axis(dist, idx[..., None], axis=-1)[..., 0]
    pad = -n % chunk
    xs = jnp.pad(values, ((0, 0), (0, pad), (0, 0))).reshape(n_problems, -1, chunk, d).transpose(1, 0, 2, 3)
    ws = jnp.pad(weights, ((0, 0), (0, pad), (0, 0))).reshape(n_problems, -1, chunk, d).transpose(1, 0, 2, 3)

    def one(xw):  # (P, chunk, d) twice
        dist = jax.vmap(_wdist)(xw[0], xw[1], codebooks)  # (P, chunk, k)
        idx = jnp.argmin(dist, axis=-1)
        return idx.astype(jnp.int32), jnp.take_along_axis(dist, idx[..., None], axis=-1)[..., 0]

    idx, dist = jax.lax.map(one, (xs, ws))  # (chunks, P, chunk)
    return (
        idx.transpose(1, 0, 2).reshape(n_problems, -1)[:, :n],
        dist.transpose(1, 0, 2).reshape(n_problems, -1)[:, :n],
    )


def _init_one(x, w, key, k: int, init: str):
    """Initial centroids (k, d) of one problem: x, w (n, d)."""
    live = jnp.sum(w, axis=-1) > 0  # (n,)
    logit0 = jnp.where(jnp.any(live), jnp.where(live, 0.0, -jnp.inf), 0.0)
    if init == "random":
        score = jnp.where(live, jax.random.uniform(key, live.shape), -1.0)
        _, pick = jax.lax.top_k(score, min(k, x.shape[0]))
        pick = jnp.concatenate([pick, jnp.full((k - pick.shape[0],), pick[0])])
        return x[pick]
    keys = jax.random.split(key, k)
    first = x[jax.random.categorical(keys[0], logit0)]
    centres = jnp.broadcast_to(first, (k, x.shape[1]))

    def body(i, carry):
        centres, d2 = carry
        logits = jnp.where(live & (d2 > 0), jnp.log(jnp.maximum(d2, 1e-30)), -jnp.inf)
        logits = jnp.where(jnp.any(jnp.isfinite(logits)), logits, logit0)  # every vector already a centre
        c = x[jax.random.categorical(keys[i], logits)]
        return centres.at[i].set(c), jnp.minimum(d2, jnp.sum(w * (x - c) ** 2, axis=-1))

    centres, _ = jax.lax.fori_loop(1, k, body, (centres, jnp.sum(w * (x - first) ** 2, axis=-1)))
    return centres


def _update(values, weights, codebooks, idx, dist):
    """One Lloyd update of P problems: weighted means per coordinate (a coordinate no member weighs keeps its old
    value), empty clusters moved to the farthest vectors. Returns codebooks (P, k, d)."""
    n_problems, k, d = codebooks.shape
    n = values.shape[1]
    seg = (jnp.arange(n_problems)[:, None] * k + idx).ravel()  # (P * n,)
    sw = jax.ops.segment_sum(weights.reshape(-1, d), seg, n_problems * k).reshape(n_problems, k, d)
    swx = jax.ops.segment_sum((weights * values).reshape(-1, d), seg, n_problems * k).reshape(n_problems, k, d)
    mean = jnp.where(sw > 0, swx / jnp.where(sw > 0, sw, 1.0), codebooks)
    empty = jnp.all(sw <= 0, axis=-1)  # (P, k)

    def relocate():
        far_d, far = jax.lax.top_k(dist, min(k, n))  # (P, m) the farthest vectors first
        rank = jnp.clip(jnp.cumsum(empty, axis=1) - 1, 0, far.shape[1] - 1)  # (P, k): i-th empty -> i-th farthest
        target = jnp.take_along_axis(far, rank, axis=1)
        moved = jnp.take_along_axis(values, target[..., None], axis=1)  # (P, k, d)
        ok = empty & (jnp.take_along_axis(far_d, rank, axis=1) > 0)
        return jnp.where(ok[..., None], moved, mean)

    return jax.lax.cond(jnp.any(empty), relocate, lambda: mean)


@functools.partial(jax.jit, static_argnames=("k", "init", "iters"))
def lloyd(values, weights, key, *, k: int, init: str = "kmeans++", iters: int = 100):
    """`fit` without its argument checks (traceable, for callers that check their inputs themselves): values with
    no weight must be 0.0. Returns what `fit` does."""
    keys = jax.random.split(key, values.shape[0])
    c0 = jax.vmap(lambda x, w, kk: _init_one(x, w, kk, k, init))(values, weights, keys)  # (P, k, d)

    def cond(carry):
        i, _, moving = carry
        return (i < iters) & moving

    def body(carry):
        i, c, _ = carry
        new = _update(values, weights, c, *assign(c, values, weights))
        return i + 1, new, jnp.any(new != c)

    _, c, _ = jax.lax.while_loop(cond, body, (0, c0, jnp.asarray(True)))
    idx, dist = assign(c, values, weights)
    return c, jnp.where(jnp.any(weights > 0, axis=-1), idx, 0), jnp.sum(dist, axis=1)


def fit(values, k: int, *, weights=None, init: str = "kmeans++", iters: int = 100, key=None):
    """Weighted vector k-means (Lloyd) of P independent problems at once.

    Args:
      values: (P, n, d) vectors to cluster.
      k: number of centroids per problem, >= 1.
      weights: (P, n, d) non-negative per-coordinate weights (None: all 1); all-zero vectors take part in nothing.
      init: "kmeans++" or "random" (k distinct vectors drawn with `key`).
      iters: at most this many Lloyd iterations (they stop once no centroid moves).
      key: PRNG key (None: key 0).

    Returns:
      (codebooks (P, k, d) float32, indices (P, n) int32 (0 for all-zero-weight vectors), inertia (P,) float32 =
      the weighted sum of squared distances of the vectors to their centroids).
    """
    check_init(init)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise errors.UserError(f"the number of clusters k must be a positive integer, got {k!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise errors.UserError(f"vector k-means iters must be a non-negative integer, got {iters!r}")
    values = jnp.asarray(values, jnp.float32)
    if values.ndim != 3:
        raise errors.UserError(f"vector k-means values must have shape (problems, n, d), got {values.shape}")
    weights = (
        jnp.ones_like(values) if weights is None else jnp.broadcast_to(jnp.asarray(weights, jnp.float32), values.shape)
    )
    if bool(jnp.any(weights < 0)) or not bool(jnp.all(jnp.isfinite(weights))):
        raise errors.UserError("vector k-means weights must be finite and non-negative")
    if not bool(jnp.all(jnp.isfinite(jnp.where(weights > 0, values, 0.0)))):
        raise errors.UserError("vector k-means values contain NaN or inf: fix or mask the weights first")
    values = jnp.where(weights > 0, values, 0.0)
    key = jax.random.key(0) if key is None else key
    return lloyd(values, weights, key, k=k, init=init, iters=iters)
