"""1-D k-means for weight sharing: Lloyd's algorithm in JAX, vectorised over independent problems, and an exact
dynamic program for small inputs.

Every function takes `values` of shape (P, n): P independent 1-D problems (one per tensor, output channel or group)
of n values each, fitted at once with `vmap`. Optional per-value `weights` (P, n) give weighted k-means (e.g. a
diagonal Fisher for sensitivity-weighted fits) and a boolean `valid` (P, n) leaves values out entirely (pruned
weights): they move no centroid, add nothing to the inertia and get index 0.

    codebooks, indices, inertia = kmeans.fit(w, 16, init="linear")   # (P, 16) f32, (P, n) uint8, (P,) f32

Lloyd runs on the sorted values: in 1-D every cluster is a run of them, so after one sort (NumPy, on the host) and
float64 prefix sums of w, w*x and w*x**2, an iteration is k binary searches and k differences per problem, O(k log n)
instead of O(n). Empty clusters are relocated (to the farthest value of the worst cluster, as scikit-learn does),
and the iterations run until no centroid moves (at most `iters`), which costs little at this price per iteration.
Codebooks come back sorted ascending, and every valid value's index is its nearest centroid (ties go to the lower
one). When a problem has no more distinct valid values than k, its codebook is those values (padded by repeating
the largest) and a one-line warning is logged.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from research import errors

log = logging.getLogger(__name__)

INITS = ("linear", "density", "random", "kmeans++")
MAX_OPTIMAL = 4096


def entries(bits: int) -> int:
    """The codebook size 2**bits for bits in 1..8 (indices fit a uint8); anything else is a UserError."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise errors.UserError(f"codebook bits must be an integer in 1..8 (2..256 entries), got {bits!r}")
    return 2 ** int(bits)


def check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= 256:
        raise errors.UserError(f"the number of clusters k must be an integer in 1..256, got {k!r}")
    return int(k)


def check_init(init: str) -> str:
    if init not in INITS:
        raise errors.UserError(f"k-means init must be one of {INITS}, got {init!r}")
    return init


def _prepare(values, weights, valid):
    """values, weights, valid as (P, n) float32 / float32 / bool arrays; NaN or inf values are a UserError."""
    values = jnp.asarray(values, jnp.float32)
    if values.ndim != 2:
        raise errors.UserError(f"k-means values must have shape (problems, n), got {values.shape}")
    valid = jnp.ones(values.shape, bool) if valid is None else jnp.broadcast_to(jnp.asarray(valid, bool), values.shape)
    weights = (
        jnp.ones(values.shape) if weights is None else jnp.broadcast_to(jnp.asarray(weights, jnp.float32), values.shape)
    )
    if not bool(jnp.all(jnp.isfinite(jnp.where(valid, values, 0.0)))):
        raise errors.UserError("k-means values contain NaN or inf: fix or mask the weights before sharing them")
    if bool(jnp.any(weights < 0)) or not bool(jnp.all(jnp.isfinite(weights))):
        raise errors.UserError("k-means weights must be finite and non-negative")
    return values, jnp.where(valid, weights, 0.0), valid


def assign(codebook, x):
    """Nearest-centroid indices of x (n,) under a sorted codebook (k,): int32 (n,), ties to the lower centroid."""
    mid = 0.5 * (codebook[1:] + codebook[:-1])  # (k - 1,)
    return jnp.searchsorted(mid, x, side="left").astype(jnp.int32)


def _inertia(codebook, idx, x, w):
    return jnp.sum(w * (x - codebook[idx]) ** 2)


def _init_one(x, w, valid, key, k: int, init: str):
    """Initial sorted codebook (k,) of one problem ("density" is `_density_init`, on the sorted values)."""
    big = jnp.finfo(jnp.float32).max
    lo = jnp.min(jnp.where(valid, x, big))
    hi = jnp.max(jnp.where(valid, x, -big))
    lo, hi = jnp.where(jnp.any(valid), lo, 0.0), jnp.where(jnp.any(valid), hi, 0.0)
    if init == "linear":
        return jnp.linspace(lo, hi, k)
    if init == "random":
        score = jnp.where(valid, jax.random.uniform(key, x.shape), -1.0)
        _, pick = jax.lax.top_k(score, min(k, x.shape[0]))
        pick = jnp.concatenate([pick, jnp.full((k - pick.shape[0],), pick[0])])
        return jnp.sort(x[pick])
    # kmeans++: the first centre uniformly among valid values, then by weight * squared distance.
    logit0 = jnp.where(valid, 0.0, -jnp.inf)
    keys = jax.random.split(key, k)
    first = x[jax.random.categorical(keys[0], logit0)]
    centres = jnp.full((k,), first)

    def body(i, carry):
        centres, d2 = carry
        logits = jnp.where(valid & (d2 * w > 0), jnp.log(jnp.maximum(d2 * w, 1e-30)), -jnp.inf)
        logits = jnp.where(jnp.any(jnp.isfinite(logits)), logits, logit0)
        c = x[jax.random.categorical(keys[i], logits)]
        return centres.at[i].set(c), jnp.minimum(d2, (x - c) ** 2)

    centres, _ = jax.lax.fori_loop(1, k, body, (centres, (x - first) ** 2))
    return jnp.sort(centres)


def _sorted_sums(values, weights, valid):
    """Each problem's valid values sorted ascending and their weighted prefix sums (NumPy, on the host).

    Returns (xs (P, n) float32 with the invalid values as +inf at the end, and s0, s1, s2 (P, n + 1) float64 with
    s_j[:, i] = sum over the first i sorted values of w * x**j). XLA:CPU's comparator sort of 1M float32 values
    takes ~240 ms where NumPy's SIMD sort takes ~4 ms (argsort ~21 ms); the sort runs once, before the iterations.
    """
    x, w, v = np.asarray(values, np.float32), np.asarray(weights, np.float64), np.asarray(valid, bool)
    key = np.where(v, x, np.float32(np.inf))
    if np.all(w == v):  # unweighted: the weights sorted are 1 for the valid values, which come first
        xs = np.sort(key, axis=1)
        ws = (np.arange(x.shape[1])[None, :] < v.sum(1, keepdims=True)).astype(np.float64)
    else:
        order = np.argsort(key, axis=1)
        xs = np.take_along_axis(key, order, axis=1)
        ws = np.take_along_axis(np.where(v, w, 0.0), order, axis=1)
    xz = np.where(np.isfinite(xs), xs, 0.0).astype(np.float64)
    zero = np.zeros((x.shape[0], 1))
    sums = [np.concatenate([zero, np.cumsum(a, axis=1)], axis=1) for a in (ws, ws * xz, ws * xz * xz)]
    return xs, *sums


def _density_init(xs, s0, k: int):
    """The weighted (k + 1/2)-quantiles of one sorted problem: (k,) float32."""
    targets = (jnp.arange(k) + 0.5) / k * s0[-1]
    pos = jnp.searchsorted(s0[1:], targets, side="left")  # the first value whose cumulative weight reaches it
    m = jnp.maximum(jnp.sum(jnp.isfinite(xs)), 1)
    return jnp.where(s0[-1] > 0, xs[jnp.minimum(pos, m - 1)], 0.0).astype(jnp.float32)


def _runs(xs, s0, s1, s2, c):
    """The clusters of one sorted problem under codebook c (k,): each is a run [lo, hi) of the sorted values.

    Returns (lo, hi) int (k,) with hi capped at the valid count, and the runs' weight, weighted sum and squared error
    (k,) float64, from differences of the prefix sums.
    """
    n = xs.shape[0]
    ends = jnp.searchsorted(xs, 0.5 * (c[1:] + c[:-1]), side="right")  # (k - 1,): the same midpoints as `assign`
    lo = jnp.concatenate([jnp.zeros(1, ends.dtype), ends])
    hi = jnp.concatenate([ends, jnp.full(1, n, ends.dtype)])
    wsum, xsum = s0[hi] - s0[lo], s1[hi] - s1[lo]
    sse = jnp.where(wsum > 0, s2[hi] - s2[lo] - xsum**2 / jnp.where(wsum > 0, wsum, 1.0), 0.0)
    return lo, jnp.minimum(hi, jnp.sum(jnp.isfinite(xs))), wsum, xsum, jnp.maximum(sse, 0.0)


def _relocate(xs, lo, hi, mean, wsum, sse):
    """Moves every empty cluster of one problem to the value farthest from its centroid in the cluster with the
    largest squared error (as scikit-learn does), the i-th empty one to the i-th largest; returns (k,) sorted."""
    n, k = xs.shape[0], mean.shape[0]
    empty = wsum <= 0
    donor = jnp.argsort(-sse)[jnp.clip(jnp.cumsum(empty) - 1, 0, k - 1)]
    first, last = xs[jnp.minimum(lo[donor], n - 1)], xs[jnp.clip(hi[donor] - 1, 0, n - 1)]
    far = jnp.where(jnp.abs(first - mean[donor]) > jnp.abs(last - mean[donor]), first, last)
    return jnp.sort(jnp.where(empty & (sse[donor] > 0), far, mean))


def _lloyd_sorted(xs, s0, s1, s2, c0, iters: int, tol: float):
    """Lloyd iterations of P sorted problems at once from c0 (P, k), each in O(k log n) per problem.

    In 1-D every cluster is a run of the sorted values: the run of centroid j ends where the values pass the midpoint
    between centroids j and j + 1, found by binary search, and its weight, weighted sum and squared sum are
    differences of the prefix sums (float64). The means of non-empty runs come out sorted; empty clusters are
    relocated (`_relocate`), a step that runs only when some problem has one. Stops once no centroid of any problem
    moves more than tol * (its initial range), or after `iters` iterations.

    Returns (codebooks (P, k) float32 sorted, inertia (P,) float64).
    """
    runs = jax.vmap(_runs)
    scale = jnp.maximum(jnp.max(c0, axis=1) - jnp.min(c0, axis=1), 1e-12)  # (P,)

    def step(c):
        lo, hi, wsum, xsum, sse = runs(xs, s0, s1, s2, c)
        mean = jnp.where(wsum > 0, xsum / jnp.where(wsum > 0, wsum, 1.0), c).astype(jnp.float32)
        return jax.lax.cond(jnp.any(wsum <= 0), lambda: jax.vmap(_relocate)(xs, lo, hi, mean, wsum, sse), lambda: mean)

    def cond(carry):
        i, _, moving = carry
        return (i < iters) & moving

    def body(carry):
        i, c, _ = carry
        new = step(c)
        return i + 1, new, jnp.any(jnp.max(jnp.abs(new - c), axis=1) > tol * scale)

    _, c, _ = jax.lax.while_loop(cond, body, (0, c0, jnp.asarray(True)))
    return c, jnp.sum(runs(xs, s0, s1, s2, c)[4], axis=1)


@functools.partial(jax.jit, static_argnames=("k", "init"))
def _init(values, weights, valid, key, *, k: int, init: str):
    keys = jax.random.split(key, values.shape[0])
    return jax.vmap(lambda x, w, v, kk: _init_one(x, w, v, kk, k, init))(values, weights, valid, keys)  # (P, k)


@functools.partial(jax.jit, static_argnames=("k", "iters", "tol"))
def _lloyd(xs, s0, s1, s2, c0, *, k: int, iters: int, tol: float):
    if c0 is None:
        c0 = jax.vmap(lambda x, s: _density_init(x, s, k))(xs, s0)
    return _lloyd_sorted(xs, s0, s1, s2, c0, iters, tol)  # (P, k), (P,)


def _fit(values, weights, valid, key, *, k: int, init: str, iters: int, tol: float):
    sums = _sorted_sums(values, weights, valid)
    c0 = None if init == "density" else _init(values, weights, valid, key, k=k, init=init)
    with jax.enable_x64(True):  # the prefix sums stay float64: float32 differences of sums of 1M values lose digits
        c, inertia = _lloyd(*sums, c0, k=k, iters=iters, tol=tol)
        inertia = inertia.astype(jnp.float32)
    idx = jax.vmap(assign)(c, values)  # (P, n)
    return c, jnp.where(valid, idx, 0).astype(jnp.uint8), inertia


def _distinct_fallback(values, valid, k: int):
    """{problem: padded distinct values (k,)} for the problems with at most k distinct valid values."""
    out = {}
    for p, (x, v) in enumerate(zip(np.asarray(values), np.asarray(valid))):
        u = np.unique(x[v])
        if len(u) <= k:
            out[p] = np.concatenate([u, np.full(k - len(u), u[-1] if len(u) else 0.0)]).astype(np.float32)
    return out


def _apply_fallback(values, weights, valid, k, codebooks, indices, inertia):
    fb = _distinct_fallback(values, valid, k)
    if not fb:
        return codebooks, indices, inertia
    log.warning(
        "k-means: %d of %d problems have <= %d distinct values; their codebook is those values",
        len(fb),
        values.shape[0],
        k,
    )
    rows = np.array(sorted(fb))
    cb = codebooks.at[rows].set(jnp.asarray(np.stack([fb[r] for r in rows])))
    idx = jax.vmap(assign)(cb, values)
    inertia = jax.vmap(_inertia)(cb, idx, values, weights)
    return cb, jnp.where(valid, idx, 0).astype(jnp.uint8), inertia


def fit(
    values, k: int, *, weights=None, valid=None, init: str = "linear", iters: int = 300, tol: float = 0.0, key=None
):
    """Weighted 1-D k-means (Lloyd) of P independent problems at once.

    Args:
      values: (P, n) values to cluster.
      k: number of centroids, 1..256.
      weights: (P, n) non-negative per-value weights (None: all 1).
      valid: (P, n) boolean; False values take part in nothing and get index 0 (None: all valid).
      init: "linear" (evenly spaced over [min, max]), "density" (quantiles), "random" (k distinct values drawn
        with `key`) or "kmeans++".
      iters: at most this many Lloyd iterations.
      tol: stop once no centroid moves more than tol * (initial codebook range); 0.0 runs until none moves.
      key: PRNG key for "random" and "kmeans++" (None: key 0).

    Returns:
      (codebooks (P, k) float32 sorted ascending, indices (P, n) uint8, inertia (P,) float32 = the weighted sum of
      squared distances of the valid values to their centroids).
    """
    k = check_k(k)
    check_init(init)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise errors.UserError(f"k-means iters must be a non-negative integer, got {iters!r}")
    values, weights, valid = _prepare(values, weights, valid)
    key = jax.random.key(0) if key is None else key
    out = _fit(values, weights, valid, key, k=k, init=init, iters=iters, tol=float(tol))
    return _apply_fallback(values, weights, valid, k, *out)


def optimal(values, k: int, *, weights=None, valid=None):
    """The exact weighted 1-D k-means of one problem, by dynamic programming over the sorted values, O(k n^2).

    Args:
      values: (n,) values, n <= 4096 (larger inputs are a UserError: use `fit`).
      k: number of centroids, 1..256.
      weights: (n,) non-negative weights (None: all 1).
      valid: (n,) boolean; False values take part in nothing and get index 0.

    Returns:
      (codebook (k,) float32 sorted, indices (n,) uint8, inertia float) like `fit` for a single problem.
    """
    k = check_k(k)
    n = np.shape(values)[-1] if np.ndim(values) else 0
    if np.ndim(values) != 1 or n > MAX_OPTIMAL:
        raise errors.UserError(
            f"optimal k-means takes one problem of at most {MAX_OPTIMAL} values, got shape {np.shape(values)}: "
            "use kmeans.fit (Lloyd) for larger inputs"
        )
    v2, w2, m2 = _prepare(
        jnp.asarray(values)[None],
        None if weights is None else jnp.asarray(weights)[None],
        None if valid is None else jnp.asarray(valid)[None],
    )
    if _distinct_fallback(v2, m2, k):
        cb, idx, inertia = _apply_fallback(v2, w2, m2, k, jnp.zeros((1, k)), None, None)
        return cb[0], idx[0], float(inertia[0])
    x, w, m = np.asarray(v2[0], np.float64), np.asarray(w2[0], np.float64), np.asarray(m2[0])
    order = np.argsort(x[m], kind="stable")
    xs, ws = x[m][order], w[m][order]
    size = len(xs)
    s0, s1, s2 = (np.concatenate([[0.0], np.cumsum(a)]) for a in (ws, ws * xs, ws * xs * xs))
    lo, hi = np.arange(size + 1)[:, None], np.arange(size + 1)[None, :]
    wsum = s0[hi] - s0[lo]
    cost = np.where(
        hi > lo, s2[hi] - s2[lo] - np.where(wsum > 0, (s1[hi] - s1[lo]) ** 2 / np.where(wsum > 0, wsum, 1), 0), np.inf
    )  # (size + 1, size + 1): cost[a, b] = weighted SSE of xs[a:b]
    best = cost[0].copy()  # best[b]: one cluster over xs[:b]
    cuts = np.zeros((k, size + 1), np.int64)
    for j in range(1, k):
        total = best[:, None] + cost  # (a, b): j clusters over xs[:a] then one over xs[a:b]
        cuts[j] = np.argmin(total, axis=0)
        best = total[cuts[j], np.arange(size + 1)]
    bounds, b = [], size
    for j in range(k - 1, -1, -1):
        a = cuts[j, b] if j else 0
        bounds.append((a, b))
        b = a
    cb = np.array([(s1[b] - s1[a]) / max(s0[b] - s0[a], 1e-300) for a, b in reversed(bounds)], np.float32)
    cb = jnp.asarray(np.sort(cb))
    idx = assign(cb, v2[0])
    inertia = float(_inertia(cb, idx, v2[0], w2[0]))
    return cb, jnp.where(m2[0], idx, 0).astype(jnp.uint8), inertia
