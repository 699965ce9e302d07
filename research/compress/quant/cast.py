"""Smaller float types for the leaves that are not worth a grid: norm scales, biases, position tables.

    t = cast("bfloat16", where=r".*(norm/scale|bias)")

`apply` rounds each selected leaf to `dtype` (round-to-nearest-even, as `astype`) and back to the leaf's own dtype,
so the model runs unchanged and the packer stores the values bit-exactly in about the bits of `dtype` (`floats`
codes the exponent and the mantissa bytes as separate streams: a float32 leaf of bfloat16 values costs ~8 bits per
value, of float8 values ~3-4). Values outside the type's range saturate to its largest finite value (float8 types
have no infinity; a NaN stays NaN).

Gradients: straight-through (`core.straight_through`), so fine-tuning keeps training the raw leaves and the
rounded values follow them. No state beyond the selection; no record is exported (the leaf is dense floats).

Which type keeps the outputs within tolerance is measured, not assumed: give `mixed` one cast option per type
and a loss budget (`max_loss_increase=`), and it picks the smallest type per leaf whose measured loss increase fits
(experiments/lossless_frontier.py does so for the norms and position tables).
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from research import errors
from research.compress import core

DTYPES = ("float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")
# Leaves that are not kernels or embeddings in the repository's models: norm scales and biases, every bias.
SMALL_LEAVES = r"(.*/)?\w*norm/(scale|bias)|.*/bias"


def cast(dtype: str = "bfloat16", *, where: str = SMALL_LEAVES) -> core.Transform:
    """Rounds the selected leaves to a smaller float type (see the module docstring).

    Args:
      dtype: one of `DTYPES`.
      where: path regex of the leaves to round (default: norm scales / biases and every bias).

    Returns:
      A `core.Transform` whose state marks the selected leaves.
    """
    if dtype not in DTYPES:
        raise errors.UserError(f"cast dtype must be one of {DTYPES}, got {dtype!r}")
    core.check_pattern(where)
    target = jnp.dtype(getattr(ml_dtypes, dtype) if dtype.startswith("float8") else dtype)
    top = float(ml_dtypes.finfo(target).max)

    def init(params, key, calib):
        return core.touched_tree(params, {p: np.bool_(True) for p in core.select(params, where)})

    def rounded(p):
        return jnp.clip(p.astype(jnp.float32), -top, top).astype(target).astype(p.dtype)

    def apply(params, state):
        return core.map_touched(lambda _, p: core.straight_through(rounded, p), state, params)

    return core.Transform(init, apply, export=lambda params, state: {})
