"""Quantization-aware training: the forward pass sees fake-quantized weights, gradients reach the raw weights
through the clipped straight-through estimator (`fake`).

Scales, two ways:
- min/max (default): stored in the state and re-fitted (as `grid.fit`) to the current weights by `init` and by
  every `update`. `make_train_step` calls `update` right after each optimizer step, so the forward pass always uses
  a grid fitted to the weights it quantizes (the same as re-fitting inside `apply` under stop_gradient), while the
  state keeps the scales that the final weights are exported with. No gradient flows into the scales.
- learned (LSQ, Esser et al. 2020; `learn_scale=True`): the scales start from the min/max fit and are trained with
  the loss through `fake.fake_quant`'s step-size gradient (the clip boundaries count, so a grid that clips too much
  widens and one that rounds too coarsely narrows). The transform's `learn` takes an Adam step of `scale_lr` on
  log(scale): steps are relative (1e-3 moves a scale by about 0.1%), scales stay positive, and LSQ's gradient
  scale factor 1 / sqrt(n * Qp), which matters for SGD, cancels under Adam's normalisation. Zero points stay as
  fitted at init. The Adam moments live in the state ("scale_opt").

State (trees mirroring params, None at untouched leaves): {"scale": float32 (scale shape), "zero": uint8}, plus
"scale_opt" with learned scales.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from research import codes, errors
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
    learn_scale: bool = False,
    scale_lr: float = 1e-4,
    gguf: str | None = None,
) -> core.Transform:
    """Fake quantization with min/max scales refreshed after every step, or learned step sizes (LSQ).

    Args:
      bits: code width, 2..8.
      where: path regex of the leaves to quantize.
      symmetric: symmetric or asymmetric grid (see `grid`).
      granularity: "tensor", "channel" or "group".
      group_size: inputs per group for granularity "group".
      learn_scale: train the scales with LSQ's gradient (see the module docstring) instead of re-fitting them.
      scale_lr: Adam learning rate of the learned log-scales (a relative step per optimizer step).
      gguf: "q4_0", "q5_0" or "q8_0": the grid of that GGUF block type (`grid.for_gguf`: groups of 32, fp16 scales
        refitted every step, llama.cpp's signed scale for Q4_0 / Q5_0), so `ziplm export --format gguf` writes the
        final codes as they are (learned scales are not fp16 numbers: export re-rounds them, or keeps F32).

    Returns:
      A `core.Transform`; `apply` is differentiable w.r.t. params (clipped STE) and, for LSQ, w.r.t. the scales.
    """
    grid = qgrid.for_gguf(gguf, qgrid.Grid(bits, symmetric, granularity, group_size), qgrid.Grid(4, True, "channel"))
    if grid.zero == "float":
        raise errors.UserError(f"qat keeps integer zero points: gguf must be q4_0, q5_0 or q8_0, not {gguf!r}")
    core.check_pattern(where)
    if not isinstance(scale_lr, int | float) or isinstance(scale_lr, bool) or not scale_lr > 0:
        raise errors.UserError(f"scale_lr must be a positive number, got {scale_lr!r}")
    tx = optax.adam(scale_lr)

    def init(params, key, calib):
        fitted = qrtn.fit_leaves(params, where, grid)
        state = {
            "scale": core.touched_tree(params, {p: s for p, (_, s, _) in fitted.items()}),
            "zero": core.touched_tree(params, {p: z.astype(jnp.uint8) for p, (_, _, z) in fitted.items()}),
        }
        if learn_scale:
            state["scale_opt"] = tx.init(state["scale"])
        return state

    def apply(params, state):
        return core.map_touched(lambda s, p, z: fake.fake_quant(p, s, z, grid), state["scale"], params, state["zero"])

    def update(params, state, grads, step):
        if learn_scale:
            return state

        def refit(s, p):
            return None if s is None else jax.lax.stop_gradient(qgrid.fit(p, grid))

        fitted = jax.tree.map(refit, state["scale"], params, is_leaf=lambda x: x is None)
        is_pair = lambda x: x is None or isinstance(x, tuple)  # noqa: E731
        return {
            "scale": jax.tree.map(lambda f: None if f is None else f[0], fitted, is_leaf=is_pair),
            "zero": jax.tree.map(lambda f: None if f is None else f[1].astype(jnp.uint8), fitted, is_leaf=is_pair),
        }

    def learn(state, grads, step):
        g = jax.tree.map(lambda gs, sc: gs * sc, grads["scale"], state["scale"])  # d loss / d log(scale)
        steps, opt = tx.update(g, state["scale_opt"])
        scale = jax.tree.map(lambda sc, u: sc * jnp.exp(u), state["scale"], steps)
        return {**state, "scale": scale, "scale_opt": opt}

    def export(params, state):
        flat, scales, zeros = core.touched(params), core.touched(state["scale"]), core.touched(state["zero"])
        return {
            p: codes.Grid(qgrid.quantize(flat[p], s, zeros[p], grid), s, zeros[p], grid.layout)
            for p, s in scales.items()
        }

    return core.Transform(init, apply, update, learn=learn if learn_scale else None, export=export)
