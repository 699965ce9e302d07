"""Magnitude (L1) pruning: remove the weights of smallest |w|, per leaf or ranked globally across leaves.

`magnitude(0.2, distribution="global")` is `torch.nn.utils.prune.global_unstructured(..., L1Unstructured,
amount=0.2)` over the selected kernels; `distribution="uniform"` prunes 20% of every leaf (`l1_unstructured`).
"""

from __future__ import annotations

import jax.numpy as jnp

from research.compress import core
from research.compress.prune import masks


def scores(params, paths) -> dict:
    """{path: |w|} of the selected leaves."""
    flat = core.touched(params)
    return {p: jnp.abs(flat[p]) for p in paths}


def magnitude(
    sparsity: float = 0.5,
    *,
    where: str = core.BLOCK_KERNELS,
    distribution: str = "uniform",
    group: str = "tensor",
    pattern: str | None = None,
) -> core.Transform:
    """Magnitude pruning as a static mask transform.

    Args:
      sparsity: fraction of the selected weights to remove, in [0, 1).
      where: path regex of the leaves to prune.
      distribution: "uniform", "global" or "erk" (see `masks.from_scores`).
      group: "tensor" or "output".
      pattern: "N:M" for semi-structured sparsity (e.g. "2:4"), overriding sparsity.
    """
    return masks.scored(
        lambda params, paths, key, calib: scores(params, paths),
        sparsity,
        where=where,
        distribution=distribution,
        group=group,
        pattern=pattern,
    )
