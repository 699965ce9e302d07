"""Quantization-aware training: the forward pass sees fake-quantized weights, gradients reach the raw weights
through the clipped straight-through estimator (`fake`).

Scales: stored in the state and re-fitted (min/max, as `grid.fit`) to the current weights by `init` and by every
`update`. `make_train_step` calls `update` right after each optimizer step, so the forward pass always uses a grid
fitted to the weights it quantizes (the same as re-fitting inside `apply` under stop_gradient), while the state
keeps the scales that the final weights are exported with. No gradient flows into the scales.

State (trees mirroring params, None at untouched leaves): {"scale": float32 (scale shape), "zero": uint8}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from research.compress import core
from research.compress.quant import fake
from research.compress.quant import grid as qgrid
from research.compress.quant import rtn as qrtn


def qat(
    bits: int = 4,
    *,
    where: str = core.BLOCK_KERNELS,
    symmetric: bool = True,
    granularity: str = "channel",
    group_size: int = 128,
) -> core.Transform:
    """Fake quantization with min/max scales refreshed after every step.

    Args:
      bits: code width, 2..8.
      where: path regex of the leaves to quantize.
      symmetric: symmetric or asymmetric grid (see `grid`).
      granularity: "tensor", "channel" or "group".
      group_size: inputs per group for granularity "group".

    Returns:
      A `core.Transform`; `apply` is differentiable w.r.t. params (clipped STE).
    """
    grid = qgrid.Grid(bits, symmetric, granularity, group_size)
    core.check_pattern(where)

    def init(params, key, calib):
        fitted = qrtn.fit_leaves(params, where, grid)
        return {
            "scale": core.touched_tree(params, {p: s for p, (_, s, _) in fitted.items()}),
            "zero": core.touched_tree(params, {p: z.astype(jnp.uint8) for p, (_, _, z) in fitted.items()}),
        }

    def apply(params, state):
        return core.map_touched(lambda s, p, z: fake.fake_quant(p, s, z, grid), state["scale"], params, state["zero"])

    def update(params, state, grads, step):
        def refit(s, p):
            return None if s is None else jax.lax.stop_gradient(qgrid.fit(p, grid))

        fitted = jax.tree.map(refit, state["scale"], params, is_leaf=lambda x: x is None)
        is_pair = lambda x: x is None or isinstance(x, tuple)  # noqa: E731
        return {
            "scale": jax.tree.map(lambda f: None if f is None else f[0], fitted, is_leaf=is_pair),
            "zero": jax.tree.map(lambda f: None if f is None else f[1].astype(jnp.uint8), fitted, is_leaf=is_pair),
        }

    return core.Transform(init, apply, update)
