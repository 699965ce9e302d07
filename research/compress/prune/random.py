"""Random pruning: the baseline every method should beat. Scores are i.i.d. uniform, a function of the key."""

from __future__ import annotations

import jax

from research.compress import core
from research.compress.prune import masks


def random(
    sparsity: float = 0.5,
    *,
    where: str = core.BLOCK_KERNELS,
    distribution: str = "uniform",
    group: str = "tensor",
    pattern: str | None = None,
) -> core.Transform:
    """Random pruning as a static mask transform (arguments as `magnitude.magnitude`); the init key decides."""

    def score(params, paths, key, calib):
        flat = core.touched(params)
        return {p: jax.random.uniform(k, flat[p].shape) for p, k in zip(paths, jax.random.split(key, len(paths)))}

    return masks.scored(score, sparsity, where=where, distribution=distribution, group=group, pattern=pattern)
