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
    sparsity = masks.check_sparsity(sparsity)
    masks.parse_pattern(pattern)
    masks.check_allocation(distribution, group, where)

    def compute(params, key, calib):
        paths = core.select(params, where)
        flat = core.touched(params)
        keys = jax.random.split(key, len(paths))
        scores = {p: jax.random.uniform(k, flat[p].shape) for p, k in zip(paths, keys)}
        return masks.from_scores(scores, sparsity, distribution=distribution, group=group, pattern=pattern)

    return masks.transform(compute)
