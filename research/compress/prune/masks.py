"""Masks from scores: how many weights each leaf keeps (uniform, global, ERK), and which (tensor-wide, per output,
or N:M groups along the input dimension). Every pruning method ends here.

Counts follow `torch.nn.utils.prune`: pruning a fraction `s` of n weights removes round(s * n) of them. Ties are
broken by position (the earlier weight is kept), so masks are deterministic. Kernels are (in, out): "per output"
compares the weights feeding one output unit (a column), and N:M keeps the N largest of every M consecutive inputs
of each output, the layout of GPU 2:4 sparse kernels.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from research import errors
from research.compress import core

DISTRIBUTIONS = ("uniform", "global", "erk")
GROUPS = ("tensor", "output")


def check_sparsity(sparsity, name: str = "sparsity") -> float:
    """`sparsity` as a float in [0, 1); anything else is a UserError."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, int | float) or not 0.0 <= sparsity < 1.0:
        raise errors.UserError(f"{name} must be a fraction in [0, 1), got {sparsity!r}")
    return float(sparsity)


def parse_pattern(pattern) -> tuple[int, int] | None:
    """ "N:M" (e.g. "2:4") as (N, M); None stays None. N > M, N < 1 or a malformed string is a UserError."""
    if pattern is None:
        return None
    try:
        n, m = (int(x) for x in str(pattern).split(":"))
    except ValueError:
        raise errors.UserError(f"N:M pattern must look like '2:4', got {pattern!r}") from None
    if not 1 <= n <= m:
        raise errors.UserError(f"N:M pattern {pattern!r} needs 1 <= N <= M (keep N of every M weights)")
    return n, m


def check_allocation(distribution: str, group: str, where: str | None = None) -> None:
    """Checks a method's allocation arguments (and its path regex) when the method is built, before any work."""
    if distribution not in DISTRIBUTIONS:
        raise errors.UserError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if group not in GROUPS:
        raise errors.UserError(f"group must be one of {GROUPS}, got {group!r}")
    if distribution == "global" and group != "tensor":
        raise errors.UserError("a global ranking compares whole tensors: use group='tensor' with it")
    if where is not None:
        core.check_pattern(where)


def check_divides(shape, m: int, path: str) -> None:
    if shape[0] % m:
        raise errors.UserError(
            f"N:M groups of {m} do not divide the input dimension {shape[0]} of {path}; "
            "choose another M or narrow the path pattern"
        )


def keep_top(scores, keep):
    """Boolean mask keeping the `keep` highest scores along the last axis (keep may be traced).

    Ties keep the earlier position. scores (..., n), keep () or broadcastable -> (..., n) bool.
    """
    order = jnp.argsort(-scores, axis=-1, stable=True)
    ranks = jnp.argsort(order, axis=-1, stable=True)
    return ranks < jnp.asarray(keep)[..., None] if jnp.ndim(keep) else ranks < keep


def n_pruned(sparsity, n: int):
    """round(sparsity * n), as torch.nn.utils.prune; works for traced sparsity."""
    if isinstance(sparsity, float | int):
        return int(round(sparsity * n))
    return jnp.round(sparsity * n).astype(jnp.int32)


def nm_mask(scores, n: int, m: int):
    """Keeps the n highest of every m consecutive inputs for each output: scores (in, out) -> bool (in, out)."""
    din, dout = scores.shape[0], math.prod(scores.shape[1:])
    groups = scores.reshape(din // m, m, dout).transpose(0, 2, 1)  # (in/m, out, m)
    keep = keep_top(groups, n)
    return keep.transpose(0, 2, 1).reshape(scores.shape)


def erk_densities(shapes: dict, density: float) -> dict:
    """Erdős–Rényi-kernel densities (Evci et al. 2020): density of a layer proportional to sum(shape) / prod(shape),
    scaled so that the kept fraction of all weights is `density`; layers that would exceed 1 stay dense and the
    rest is re-scaled."""
    sizes = {p: math.prod(s) for p, s in shapes.items()}
    raw = {p: sum(s) / sizes[p] for p, s in shapes.items()}
    total = sum(sizes.values())
    dense: set = set()
    while True:
        budget = density * total - sum(sizes[p] for p in dense)
        eps = budget / sum(raw[p] * sizes[p] for p in shapes if p not in dense)
        over = [p for p in shapes if p not in dense and eps * raw[p] > 1.0]
        if not over:
            return {p: 1.0 if p in dense else eps * raw[p] for p in shapes}
        dense.update(over)


def leaf_sparsities(shapes: dict, sparsity: float, distribution: str) -> dict:
    """{path: sparsity} for "uniform" (the same everywhere) or "erk"; "global" is decided jointly in `from_scores`."""
    if distribution == "erk":
        return {p: 1.0 - d for p, d in erk_densities(shapes, 1.0 - sparsity).items()}
    return dict.fromkeys(shapes, sparsity)


def from_scores(scores: dict, sparsity, *, distribution: str = "uniform", group: str = "tensor", pattern=None):
    """Masks keeping the highest scores.

    Args:
      scores: {path: score array}, higher = more important (same shape as the weight).
      sparsity: fraction of weights to prune (a float, or a traced scalar for schedules with "uniform"/"global").
      distribution: "uniform" (each leaf loses `sparsity`), "global" (one ranking across all leaves) or "erk".
      group: "tensor" (rank within the whole leaf) or "output" (within each output unit's inputs, as Wanda).
      pattern: "N:M" for semi-structured masks (then sparsity, distribution and group are ignored).

    Returns:
      {path: bool mask}.
    """
    nm = parse_pattern(pattern)
    if nm is not None:
        for p, s in scores.items():
            check_divides(s.shape, nm[1], p)
        return {p: nm_mask(s, *nm) for p, s in scores.items()}
    if distribution not in DISTRIBUTIONS:
        raise errors.UserError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if group not in GROUPS:
        raise errors.UserError(f"group must be one of {GROUPS}, got {group!r}")
    if distribution == "global":
        if group != "tensor":
            raise errors.UserError("a global ranking compares whole tensors: use group='tensor' with it")
        flat = jnp.concatenate([s.reshape(-1).astype(jnp.float32) for s in scores.values()])
        keep = keep_top(flat, flat.size - n_pruned(sparsity, flat.size))
        out, start = {}, 0
        for p, s in scores.items():
            out[p] = keep[start : start + s.size].reshape(s.shape)
            start += s.size
        return out
    per_leaf = leaf_sparsities({p: tuple(s.shape) for p, s in scores.items()}, sparsity, distribution)
    out = {}
    for p, s in scores.items():
        if group == "output":
            cols = jnp.moveaxis(s.reshape(s.shape[0], -1), 0, -1)  # (out, in)
            keep = keep_top(cols, s.shape[0] - n_pruned(per_leaf[p], s.shape[0]))
            out[p] = jnp.moveaxis(keep, -1, 0).reshape(s.shape)
        else:
            keep = keep_top(s.reshape(-1), s.size - n_pruned(per_leaf[p], s.size))
            out[p] = keep.reshape(s.shape)
    return out


def transform(compute: callable) -> core.Transform:
    """A static mask transform: `compute(params, key, calib) -> {path: bool mask}` runs once, in init.

    State: {"masks": tree of bool masks mirroring params, None at untouched leaves}.
    """

    def init(params, key, calib):
        return {"masks": core.touched_tree(params, compute(params, key, calib))}

    return core.Transform(init, lambda params, state: core.apply_masks(params, state["masks"]), masks=_masks)


def scored(score: callable, sparsity, *, where: str, distribution: str, group: str, pattern) -> core.Transform:
    """A static mask transform that keeps the highest-scoring weights, its settings checked when it is built.

    Args:
      score: (params, paths, key, calib) -> {path: scores of the leaf's shape}, run once, in init.
      sparsity, where, distribution, group, pattern: as `magnitude.magnitude` (see `from_scores`).
    """
    sparsity = check_sparsity(sparsity)
    parse_pattern(pattern)
    check_allocation(distribution, group, where)

    def compute(params, key, calib):
        s = score(params, core.select(params, where), key, calib)
        return from_scores(s, sparsity, distribution=distribution, group=group, pattern=pattern)

    return transform(compute)


def _masks(state):
    return state["masks"]


def sparsity_of(masks) -> dict:
    """{path: fraction pruned} of a mask tree, plus "total" over all masked leaves."""
    flat = core.touched(masks)
    out = {p: 1.0 - float(np.mean(np.asarray(m))) for p, m in flat.items()}
    n = sum(m.size for m in flat.values())
    out["total"] = 1.0 - sum(float(np.sum(np.asarray(m))) for m in flat.values()) / n if n else 0.0
    return out
