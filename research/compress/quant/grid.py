"""Uniform integer quantization grids: settings (`Grid`), min/max fitting, quantize and dequantize.

Conventions (one for every grid, so packing sees one format):

- Codes are uint8 in [0, 2**bits - 1]; a code dequantizes to (code - zero) * scale (`zero="integer"`, the
  default) or to code * scale + zero (`zero="float"`, a float minimum: GGUF Q4_1's parametrisation).
- Integer zero point: `zero` is the code of 0.0, so 0.0 is exactly representable and a pruned weight stays exactly
  0.0 through quantize/dequantize. It is returned as an integer-valued float32; rtn stores it as uint8.
- Symmetric: zero = 2**(bits-1) and, with `sym_scale="full"` (ziplm's), scale = max|w| / (2**(bits-1) - 1), so
  the signed values code - zero lie in [-2**(bits-1), 2**(bits-1) - 1] and +-max|w| are exact (the extra negative
  code is representable but unused by the fit); with `sym_scale="reference"` (the GPTQ reference code's and
  llm-compressor's), scale = max|w| / (2**(bits-1) - 0.5) = 2 max|w| / (2**bits - 1), which uses every code
  (+max|w| rounds to the top code, 0.5 scale short); with `sym_scale="signed"` (llama.cpp's Q4_0 and Q5_0),
  scale = m / -2**(bits-1) where m is the weight of largest magnitude with its sign: m gets code 0 exactly, the
  scale is negative when m is positive, and the other side reaches (2**(bits-1) - 1) / 2**(bits-1) of |m| (every
  code used, one step finer than "full").
- Asymmetric: the range [min(w, 0), max(w, 0)] is spread over all 2**bits codes, scale = range / (2**bits - 1),
  zero = round(-min / scale) (as the reference code). Rounding the zero point shifts the range by at most scale /
  2, so the round-trip error of any w inside [min, max] is at most scale / 2.
- Float minimum (`zero="float"`, always asymmetric): scale = (max - min) / (2**bits - 1) and zero = min over the
  group's own range (0 need not be inside it), so both ends are exact; 0.0 is generally not representable, so
  pruned weights do not survive this grid (use the integer zero point after pruning). With
  `param_dtype="float16"` scale and minimum are rounded to float16, as GGUF stores them: requantizing a
  dequantized Q4_1 tensor with `Grid(4, False, "group", 32, zero="float", param_dtype="float16")` is exact.
- GGUF block types (`for_gguf`, the `gguf=` argument of rtn and gptq): Q4_0 is the 4-bit symmetric grid (zero 8),
  Q5_0 the 5-bit (zero 16), Q8_0 the 8-bit (zero 128: int8 codes), Q4_1 / Q5_1 the float-minimum grids, each in
  groups of 32 with float16 scales, so `ziplm export --format gguf` writes the codes unchanged.
- A group whose weights are all equal gets scale 1 (any scale represents it exactly).

Kernels are (in, *out). Scale and zero shapes by granularity are `research.codes.Layout`'s (`Grid.layout`; they
broadcast through `layout.expand`):
  "tensor":  ()              one scale for the leaf
  "channel": (*out,)         one per output column (reduced over the input dimension)
  "group":   (ceil(in / g), *out) one per g consecutive inputs of each output column; when g does not divide
             the input dimension the last group is shorter (as in the GPTQ reference code: SmolLM2's 576 inputs
             in groups of 128 are four of 128 and one of 64)
  "row", "row-group": "channel" and "group" of the transposed 2-D leaf: one scale per row, or per g consecutive
             entries of a row; for embedding tables (V, D), whose rows are tokens (GGUF's embedding blocks are
             "row-group" 32)
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from research import codes as codes_lib
from research import errors

GRANULARITIES = codes_lib.GRANULARITIES
ZEROS = ("integer", "float")
SYM_SCALES = ("full", "reference", "signed")
PARAM_DTYPES = ("float32", "float16")


@dataclasses.dataclass(frozen=True)
class Grid:
    """Quantization grid settings (hashable, so it can be a static argument).

    Attributes:
      bits: code width, an int in 2..8.
      symmetric: symmetric (zero fixed at 2**(bits-1)) or asymmetric (zero point fitted) grid.
      granularity: "tensor", "channel" (per output column), "group" (groups along the input dimension), "row"
        (per row of a 2-D leaf: an embedding's tokens) or "row-group" (groups along each row).
      group_size: entries per group for the grouped granularities.
      zero: "integer" (a zero-point code) or "float" (a float minimum, GGUF Q4_1-style).
      sym_scale: symmetric scale convention, "full" (max|w| / (2**(b-1) - 1)), "reference" (/ (2**(b-1) - 0.5)) or
        "signed" (the signed largest-magnitude weight / -2**(b-1), llama.cpp's Q4_0).
      param_dtype: "float32" or "float16" (scales and float minimums rounded to float16, as GGUF stores them).
    """

    bits: int = 4
    symmetric: bool = True
    granularity: str = "channel"
    group_size: int = 128
    zero: str = "integer"
    sym_scale: str = "full"
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.zero not in ZEROS:
            raise errors.UserError(f"zero must be one of {ZEROS}, got {self.zero!r}")
        if self.zero == "float" and self.symmetric:
            raise errors.UserError("a float-minimum grid (zero='float') is asymmetric: set symmetric=False")
        if self.sym_scale not in SYM_SCALES:
            raise errors.UserError(f"sym_scale must be one of {SYM_SCALES}, got {self.sym_scale!r}")
        if self.param_dtype not in PARAM_DTYPES:
            raise errors.UserError(f"param_dtype must be one of {PARAM_DTYPES}, got {self.param_dtype!r}")
        b = self.bits
        if isinstance(b, bool) or not isinstance(b, int | np.integer) or not 2 <= b <= 8:
            raise errors.UserError(f"bits must be in 2..8 (an integer), got {b!r}")
        if self.granularity not in GRANULARITIES:
            raise errors.UserError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        g = self.group_size
        bad = isinstance(g, bool) or not isinstance(g, int | np.integer) or g < 1
        if self.granularity in ("group", "row-group") and bad:
            raise errors.UserError(f"group_size must be a positive integer, got {g!r}")

    @property
    def layout(self) -> codes_lib.Layout:
        """Where the scales and zero points lie (`research.codes.Layout`)."""
        return codes_lib.Layout.of(self.granularity, self.group_size)

    @property
    def maxq(self) -> int:
        """The largest code, 2**bits - 1."""
        return 2**self.bits - 1

    def describe(self) -> str:
        """The grid's convention in words, for reports (every reported row names the convention it used)."""
        if self.zero == "float":
            kind = "asymmetric, float minimum"
        elif self.symmetric:
            kind = {
                "reference": "symmetric (max/(2^(b-1)-0.5), reference)",
                "signed": "symmetric (signed max/-2^(b-1), llama.cpp's)",
            }.get(self.sym_scale, "symmetric (max/(2^(b-1)-1))")
        else:
            kind = "asymmetric, integer zero point"
        where = {"tensor": "per tensor", "channel": "per channel", "group": f"groups of {self.group_size}"}
        dtype = ", fp16 parameters" if self.param_dtype == "float16" else ""
        return f"{self.bits}-bit {kind}, {where[self.granularity]}{dtype}"


# The grid of each GGUF block type (`research.export.blocks`): groups of 32 inputs, float16 scales (and minimums).
GGUF = {
    "q4_0": dict(bits=4, symmetric=True, zero="integer", sym_scale="signed"),
    "q4_1": dict(bits=4, symmetric=False, zero="float"),
    "q5_0": dict(bits=5, symmetric=True, zero="integer", sym_scale="signed"),
    "q5_1": dict(bits=5, symmetric=False, zero="float"),
    "q8_0": dict(bits=8, symmetric=True, zero="integer"),
}


def for_gguf(kind: str | None, given: Grid, default: Grid) -> Grid:
    """`given` constrained to a GGUF block type's exact parametrisation, so that `ziplm export --format gguf`
    writes its codes as they are (`kind` None: `given` unchanged).

    Args:
      kind: "q4_0", "q4_1", "q5_0", "q5_1" or "q8_0".
      given: the grid a method's arguments describe; default: the grid of its default arguments. A setting that
        differs from both its default and the type's is a contradiction (UserError), not silently replaced. The
        symmetric types fit llama.cpp's way (`sym_scale="signed"`) unless another sym_scale is given.
    """
    if kind is None:
        return given
    if kind not in GGUF:
        raise errors.UserError(f"gguf must be one of {', '.join(GGUF)}, got {kind!r}")
    fixed = dict(GGUF[kind], granularity="group", group_size=32, param_dtype="float16")
    if given.sym_scale != default.sym_scale:  # any scale fits a block type: a fit asked for is kept
        fixed.pop("sym_scale", None)
    if given.granularity == "group" and given.group_size != 32:  # groups asked for: their size is deliberate
        raise errors.UserError(f"gguf={kind!r} fixes group_size=32; drop group_size={given.group_size}")
    for key, value in fixed.items():
        mine = getattr(given, key)
        if mine != value and mine != getattr(default, key):
            raise errors.UserError(f"gguf={kind!r} fixes {key}={value!r}; drop {key}={mine!r}")
    return dataclasses.replace(given, **fixed)


def check_shape(shape, grid: Grid, path: str = "weight") -> None:
    """Raises UserError when `grid` cannot quantize a leaf of `shape` (not a kernel, or groups wider than it)."""
    if grid.granularity == "tensor":
        return
    if grid.layout.transposed:
        if len(shape) != 2:
            raise errors.UserError(
                f"{path} has shape {tuple(shape)}: granularity {grid.granularity!r} needs a 2-D table (rows, cols); "
                "use 'channel' / 'group' for kernels or narrow the path pattern"
            )
        if grid.granularity == "row-group" and grid.group_size > shape[1]:
            raise errors.UserError(
                f"group size {grid.group_size} exceeds the row length {shape[1]} of {path}; choose a smaller group_size"
            )
        return
    if len(shape) < 2:
        raise errors.UserError(
            f"{path} has shape {tuple(shape)}: granularity {grid.granularity!r} needs an (in, out) kernel; "
            "use granularity='tensor' or narrow the path pattern"
        )
    if grid.granularity == "group" and grid.group_size > shape[0]:
        raise errors.UserError(
            f"group size {grid.group_size} exceeds the input dimension {shape[0]} of {path}; "
            "choose a smaller group_size or narrow the path pattern"
        )


def check_finite(w, path: str = "weight") -> None:
    """Raises UserError when `w` holds NaN or Inf (call eagerly, on concrete arrays)."""
    if not np.isfinite(np.asarray(w, np.float32)).all():
        raise errors.UserError(f"{path} holds NaN or Inf weights; a quantization grid cannot be fitted to it")


def reduce(x, grid: Grid, op):
    """Reduces a (in, *out) array to the scale shape of `grid` with op (jnp.min, jnp.max, jnp.sum...)."""
    if grid.layout.transposed:  # the column layout of the transposed table
        check_shape(x.shape, grid)
        x, grid = x.T, dataclasses.replace(grid, granularity=grid.layout.columns.granularity)
    if grid.granularity == "tensor":
        return op(x)
    if grid.granularity == "channel":
        return op(x, axis=0)  # (*out,)
    check_shape(x.shape, grid)
    g = grid.group_size
    pad = -x.shape[0] % g
    if pad:  # a shorter last group: pad with values that leave the reduction unchanged
        widths = ((0, pad),) + ((0, 0),) * (x.ndim - 1)
        x = jnp.pad(x, widths) if op is jnp.sum else jnp.pad(x, widths, mode="edge")
    return op(x.reshape(x.shape[0] // g, g, *x.shape[1:]), axis=1)  # (ceil(in / g), *out)


def fit(w, grid: Grid):
    """Min/max fit of a grid to weights (traceable; validate with `check_finite` beforehand).

    Args:
      w: weights (in, *out), any float dtype.
      grid: the grid settings.

    Returns:
      (scale, zero): float32 arrays of the scale shape (see module docstring); zero is integer-valued.
    """
    w = jnp.asarray(w, jnp.float32)
    if grid.zero == "float":
        lo, hi = reduce(w, grid, jnp.min), reduce(w, grid, jnp.max)
        lo = _param(lo, grid)
        scale = _param((hi - lo) / grid.maxq, grid)
        return jnp.where(scale > 0, scale, 1.0), lo
    if grid.symmetric and grid.sym_scale == "signed":  # llama.cpp's Q4_0 / Q5_0: the largest |w| gets code 0
        half = 2 ** (grid.bits - 1)
        hi, lo = reduce(w, grid, jnp.max), reduce(w, grid, jnp.min)
        scale = _param(jnp.where(-lo > hi, lo, hi) / -half, grid)  # negative when that weight is positive
        scale = jnp.where(scale != 0, scale, 1.0)
        return scale, jnp.full_like(scale, half)
    if grid.symmetric:
        half = 2 ** (grid.bits - 1)
        absmax = reduce(jnp.abs(w), grid, jnp.max)
        scale = _param(absmax / (half - (0.5 if grid.sym_scale == "reference" else 1)), grid)
        scale = jnp.where(scale > 0, scale, 1.0)
        return scale, jnp.full_like(scale, half)
    lo = jnp.minimum(reduce(w, grid, jnp.min), 0.0)
    hi = jnp.maximum(reduce(w, grid, jnp.max), 0.0)
    scale = _param((hi - lo) / grid.maxq, grid)
    scale = jnp.where(scale > 0, scale, 1.0)
    zero = jnp.clip(jnp.round(-lo / scale), 0, grid.maxq)
    return scale, zero


def _param(x, grid: Grid):
    return x.astype(jnp.float16).astype(jnp.float32) if grid.param_dtype == "float16" else x


def to_codes(w, s, z, grid: Grid):
    """Elementwise round-to-nearest float codes of w given broadcastable scale s and zero z (unclipped dtype)."""
    v = (w - z) / s if grid.zero == "float" else w / s + z
    return jnp.clip(jnp.round(v), 0, grid.maxq)


def from_codes(c, s, z, grid: Grid):
    """Elementwise dequantization of float or integer codes c given broadcastable scale s and zero z (float32)."""
    return codes_lib.grid_values(c, s, z, codes_lib.Layout("tensor"), grid.zero == "float")


def quantize(w, scale, zero, grid: Grid):
    """Round-to-nearest codes (see the module docstring) as uint8, the shape of w."""
    w = jnp.asarray(w, jnp.float32)
    s = grid.layout.expand(jnp.asarray(scale, jnp.float32), w.shape)
    z = grid.layout.expand(jnp.asarray(zero, jnp.float32), w.shape)
    return to_codes(w, s, z, grid).astype(jnp.uint8)


def dequantize(codes, scale, zero, grid: Grid):
    """The values of `codes` as float32 ((code - zero) * scale, or code * scale + zero for a float minimum)."""
    return codes_lib.grid_values(
        codes, jnp.asarray(scale, jnp.float32), jnp.asarray(zero, jnp.float32), grid.layout, grid.zero == "float"
    )
