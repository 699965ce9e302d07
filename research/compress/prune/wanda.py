"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models"): prune by weight
magnitude times input activation norm, no weight update.

The score of kernel entry W[j, i] (input j, output i; kernels are (in, out)) is |W[j, i]| * ||X_j||_2, the L2 norm
of input feature j over every calibration token. By default the weights feeding each output unit compete among
themselves (group="output", the paper's per-output comparison); "N:M" keeps the N highest of every M consecutive
inputs of each output. Blocks are pruned in order, each calibrated on the outputs of the already-pruned blocks
before it, as in the reference code (locuslab/wanda).

Counts follow `masks`: round(sparsity * n) pruned per group (the reference floors). "N:M" keeps N of every M, as
everywhere in `masks` (the reference's prune_n counts the pruned weights; the two agree for 2:4 and 4:8).
"""

from __future__ import annotations

import jax.numpy as jnp

from research import errors
from research.compress import calib, core
from research.compress.prune import masks


def scores(kernel, sqnorm):
    """Wanda scores |W[j, i]| * ||X_j||_2.

    Args:
      kernel: (in, out) weights.
      sqnorm: (in,) sum over calibration tokens of each input feature's square.

    Returns:
      (in, out) float32 scores.
    """
    norm = jnp.sqrt(jnp.maximum(sqnorm.astype(jnp.float32), 0.0))  # (in,)
    return jnp.abs(kernel.astype(jnp.float32)) * norm[:, None]


def wanda(
    sparsity: float = 0.5,
    *,
    where: str = core.BLOCK_KERNELS,
    group: str = "output",
    pattern: str | None = None,
) -> core.Transform:
    """Wanda pruning as a static mask transform computed from calibration data in init.

    Args:
      sparsity: fraction of each selected kernel to remove, in [0, 1).
      where: path regex of the kernels to prune (linear kernels inside the blocks).
      group: "output" (compare within each output unit, the paper's choice) or "tensor".
      pattern: "N:M" for semi-structured sparsity (e.g. "2:4"), overriding sparsity and group.

    Returns:
      A Transform with state {"masks": tree of bool masks}; init needs a `calib.Calibration`.
    """
    sparsity = masks.check_sparsity(sparsity)
    nm = masks.parse_pattern(pattern)
    if group not in masks.GROUPS:
        raise errors.UserError(f"group must be one of {masks.GROUPS}, got {group!r}")

    def compute(params, key, calib_data):
        calib_data = calib.require(calib_data, "wanda")
        paths = core.select(params, where)
        if nm is not None:
            flat = core.touched(params)
            for p in paths:
                masks.check_divides(flat[p].shape, nm[1], p)
        found: dict = {}

        def visit(i, stats, n_tokens, kernels):
            for name, st in stats.items():
                if not bool(jnp.all(jnp.isfinite(st))):
                    raise errors.UserError(f"wanda: non-finite calibration activations entering layers/{i}/{name}")
            s = {name: scores(kernels[name], stats[name]) for name in kernels}
            m = masks.from_scores(s, sparsity, group=group, pattern=pattern)
            found.update({f"layers/{i}/{name}/kernel": m[name] for name in kernels})
            return {name: jnp.where(m[name], k, jnp.zeros((), k.dtype)) for name, k in kernels.items()}

        calib.walk(calib_data, params, paths, visit, stat="sqnorm", desc="wanda", records=(found,))
        return found

    return masks.transform(compute)
