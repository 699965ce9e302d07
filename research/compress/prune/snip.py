"""Saliency pruning from calibration data: first-order Taylor / SNIP scores |g * w|.

g is the gradient of the mean next-token loss on the calibration windows (averaged over batches), w the weight;
the score estimates how much the loss changes when the weight is removed (Molchanov et al. 2017; SNIP, Lee et al.
2019, ranks the same quantity globally, hence the default distribution here).
"""

from __future__ import annotations

import jax.numpy as jnp

from research.compress import calib as calib_lib
from research.compress import core
from research.compress.prune import masks


def scores(calib: calib_lib.Calibration, params, paths) -> dict:
    """{path: |g * w|} of the selected leaves."""
    grads, flat = core.touched(calib_lib.gradients(calib, params)), core.touched(params)
    return {p: jnp.abs(grads[p] * flat[p]) for p in paths}


def snip(
    sparsity: float = 0.5,
    *,
    where: str = core.BLOCK_KERNELS,
    distribution: str = "global",
    group: str = "tensor",
    pattern: str | None = None,
) -> core.Transform:
    """Gradient x weight pruning as a static mask transform (arguments as `magnitude.magnitude`); needs calibration."""

    def score(params, paths, key, calib):
        return scores(calib_lib.require(calib, "snip"), params, paths)

    return masks.scored(score, sparsity, where=where, distribution=distribution, group=group, pattern=pattern)
