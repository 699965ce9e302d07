"""Round-to-nearest (RTN) weight-only post-training quantization: fit a min/max grid, round every weight.

State (each a tree mirroring params, None at untouched leaves):
  {"codes": uint8 (shape of the weight), "scale": float32 (scale shape), "zero": uint8 (scale shape; float32 for a
  float-minimum grid, `zero="float"`)}
The codes are the compressed weights (packing stores them); `apply` returns dequantize(codes) and does not read the
touched params, so their gradient through it is zero: RTN is for one-shot PTQ, fine-tune with `qat` instead.

In `core.chain(prune, rtn(...))` rtn is fitted to the pruned weights; 0.0 maps to the integer zero code and back to
exactly 0.0 on every grid, so masks survive quantization.
"""

from __future__ import annotations

import jax.numpy as jnp

from research import codes
from research.compress import core
from research.compress.quant import grid as qgrid


def fit_leaves(params, where: str, grid: qgrid.Grid) -> dict:
    """{path: (w, scale, zero)} of the selected leaves, validated (shape, finiteness) eagerly."""
    flat = core.touched(params)
    out = {}
    for p in core.select(params, where):
        w = flat[p]
        qgrid.check_shape(w.shape, grid, p)
        qgrid.check_finite(w, p)
        out[p] = (w, *qgrid.fit(w, grid))
    return out


def rtn(
    bits: int = 4,
    *,
    where: str = core.BLOCK_KERNELS,
    symmetric: bool = False,
    granularity: str = "channel",
    group_size: int = 128,
    zero: str = "integer",
    sym_scale: str = "full",
    param_dtype: str = "float32",
    gguf: str | None = None,
) -> core.Transform:
    """Round-to-nearest quantization as a static transform.

    Args:
      bits: code width, 2..8.
      where: path regex of the leaves to quantize.
      symmetric: symmetric or asymmetric grid (see `grid`); asymmetric by default, as the GPTQ reference scripts.
      granularity: "tensor", "channel" or "group".
      group_size: inputs per group for granularity "group".
      zero, sym_scale, param_dtype: the grid's conventions (see `grid.Grid`): a float minimum ("float", GGUF
        Q4_1-style), the reference symmetric scale, float16 scales.
      gguf: a GGUF block type ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0"): the grid becomes that type's exact
        parametrisation (groups of 32, float16 scales; `grid.for_gguf`), so a GGUF export writes these codes as
        they are.

    Returns:
      A `core.Transform` whose state holds uint8 codes, float32 scales and uint8 zero points (float32 minimums).
    """
    grid = qgrid.Grid(bits, symmetric, granularity, group_size, zero, sym_scale, param_dtype)
    grid = qgrid.for_gguf(gguf, grid, qgrid.Grid(4, False, "channel", 128))
    core.check_pattern(where)

    def init(params, key, calib):
        fitted = fit_leaves(params, where, grid)
        leaves = {p: (qgrid.quantize(w, s, z, grid), s, z) for p, (w, s, z) in fitted.items()}
        return codes_state(params, leaves, grid)

    return core.Transform(init, dequantizer(grid), export=exporter(grid))


def exporter(grid: qgrid.Grid):
    """The `export` of a code-based quantizer: its codes, scales and zero points as `codes.Grid` records."""

    def export(params, state):
        c, s, z = (core.touched(state[k]) for k in ("codes", "scale", "zero"))
        return {p: codes.Grid(c[p], s[p], z[p], grid.layout, grid.zero == "float") for p in c}

    return export


def codes_state(params, leaves: dict, grid: qgrid.Grid) -> dict:
    """The state of a code-based quantizer from {path: (uint8 codes, scale, zero)}: {"codes", "scale", "zero"},
    each a tree mirroring params (None at untouched leaves), zero points stored as uint8 (float32 minimums for a
    float-minimum grid)."""
    zero_dtype = jnp.float32 if grid.zero == "float" else jnp.uint8
    return {
        name: core.touched_tree(params, {p: v[i] if i < 2 else v[i].astype(zero_dtype) for p, v in leaves.items()})
        for i, name in enumerate(("codes", "scale", "zero"))
    }


def dequantizer(grid: qgrid.Grid):
    """The `apply` of a code-based quantizer: dequantized codes at the touched leaves, in the params' dtype."""

    def apply(params, state):
        return core.map_touched(
            lambda c, p, s, z: qgrid.dequantize(c, s, z, grid).astype(p.dtype),
            state["codes"],
            params,
            state["scale"],
            state["zero"],
        )

    return apply
