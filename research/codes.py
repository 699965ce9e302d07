"""What a compressed leaf is: the typed records `Transform.export` returns and `coding.pack` serialises, and the
one layout convention (tensor / channel / group) that quantization grids, codebooks and the packer share.

A transform's export is {path: code} for the leaves it changed; a leaf absent from it is dense floats, which the
packer searches for structure of its own. A record describes the leaf's *effective* values (what `apply` gives):

    Masked(mask)                              the entries where mask is False are exactly 0.0; the kept entries are
                                              the leaf's own floats (the packer codes them bit-exactly)
    Grid(codes, scale, zero, layout)          value = (code - zero) * scale, or code * scale + zero with
                                              `float_zero` (a float minimum, GGUF Q4_1's parametrisation)
    Palette(indices, table, layout, keep)     value = table[problem, index], and 0.0 where keep is False
    Vectors(indices, table, layout, keep)     vector quantization: the leaf cut into vectors of d weights, each
                                              the sum over stages s of table[s, problem, indices[s, vector]]
                                              (d values), and 0.0 where keep is False

`decode` gives a record's values as float32 (NumPy), as the forward pass computes them; the packer checks them
against the leaf bit for bit before it writes a byte. `compose` is how a chain's later member refines an earlier
member's record of the same leaf (pruning after quantization keeps the grid; see `core.chain`).

Layouts, for a kernel (in, *out); "tensor" applies to any shape:

    granularity  grid parameters (scale, zero)   palette problems (P, n) of `to_problems`
    "tensor"     ()                              P = 1: the whole leaf
    "channel"    (*out,)                         P = out (the last axis): row o is the column kernel[:, o]
    "group"      (ceil(in / g), *out)            P = out * in / g: row o * (in / g) + j is kernel[j*g:(j+1)*g, o]
    "row"        (rows,)                         "channel" of the transposed leaf: one problem per row
    "row-group"  (ceil(cols / g), rows)          "group" of the transposed leaf: groups of g along each row

The row layouts are for 2-D tables read by rows: an embedding (V, D) is the transposed (D, V) kernel of the head it
is when tied, so "row" gives every token its own scale (the head's output channel) and "row-group" 32 is GGUF's
block layout of an embedding (blocks of 32 along D). They are defined as the column layouts of `w.T`, parameters
included (a "row-group" grid's scales are (ceil(D / g), V)).

A grid's last group may be shorter (ceil; SmolLM2's 576 inputs in groups of 128), a palette's groups must divide
the inputs.

Vectors (`Vectors`, `to_vectors`) are d consecutive *inputs* of one output column, kernel[j*d:(j+1)*d, o], or under
the row layout d consecutive entries of a row of a 2-D table, table[v, j*d:(j+1)*d]. They tile a vector grid
(`vector_grid`): (in / d, *out) for a kernel, (rows, cols / d) for a table, whose entries the indices are and which
the layouts "tensor" (one codebook), "channel" (one per output column) and "row" (one per row) cut into problems
exactly as they cut a leaf (`Layout.to_problems` of the grid).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

GRANULARITIES = ("tensor", "channel", "group", "row", "row-group")
_GROUPED = ("group", "row-group")
_COLUMNS = {"row": "channel", "row-group": "group"}


def _xp(a):
    return np if isinstance(a, np.ndarray | np.generic) else jnp


@dataclasses.dataclass(frozen=True)
class Layout:
    """How per-problem parameters map onto a leaf (see the module docstring).

    Attributes:
      granularity: "tensor", "channel", "group", "row" or "row-group".
      group_size: inputs per group (granularities "group" and "row-group" only; 0 otherwise).
    """

    granularity: str = "tensor"
    group_size: int = 0

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if (self.granularity in _GROUPED) != (self.group_size > 0):
            raise ValueError(f"group_size {self.group_size} does not fit granularity {self.granularity!r}")

    @classmethod
    def of(cls, granularity: str, group_size: int) -> Layout:
        """The layout of a granularity; `group_size` counts only for the grouped ones (methods carry one
        regardless)."""
        return cls(granularity, group_size if granularity in _GROUPED else 0)

    @property
    def transposed(self) -> bool:
        """Whether this is a row layout: the column layout (`columns`) of the leaf's transpose."""
        return self.granularity in _COLUMNS

    @property
    def columns(self) -> Layout:
        """The column layout a row layout applies to the transposed leaf (itself for the others)."""
        return Layout(_COLUMNS[self.granularity], self.group_size) if self.transposed else self

    @property
    def grouped(self) -> bool:
        return self.granularity in _GROUPED

    def param_shape(self, shape) -> tuple:
        """The shape of a grid's scales and zero points for a leaf of `shape`."""
        shape = tuple(shape)
        if self.transposed:
            return self.columns.param_shape(_flip(shape))
        if self.granularity == "tensor":
            return ()
        if self.granularity == "channel":
            return shape[1:]
        return (-(-shape[0] // self.group_size), *shape[1:])

    def expand(self, a, shape):
        """Grid parameters (`param_shape`) broadcastable against a leaf of `shape` (NumPy or JAX, traceable)."""
        if self.transposed:
            return self.columns.expand(a, _flip(shape)).T
        if self.granularity == "tensor":
            return a
        if self.granularity == "channel":
            return a[None]  # (1, *out)
        return _xp(a).repeat(a, self.group_size, axis=0)[: shape[0]]  # (in, *out)

    def n_problems(self, shape) -> int:
        """P, the number of palette problems of a leaf of `shape`."""
        if self.transposed:
            return self.columns.n_problems(_flip(shape))
        size = int(np.prod(shape, dtype=np.int64))
        if self.granularity == "tensor":
            return 1
        if self.granularity == "channel":
            return shape[-1]
        return size // self.group_size

    def to_problems(self, w):
        """A leaf as (P, n) rows of independent palette problems."""
        if self.transposed:
            return self.columns.to_problems(w.T)
        if self.granularity == "tensor":
            return w.reshape(1, -1)
        cols = w.reshape(-1, w.shape[-1]).T  # (out, in)
        if self.granularity == "channel":
            return cols
        return cols.reshape(-1, self.group_size)  # (out * in / g, g)

    def from_problems(self, x, shape):
        """Inverse of `to_problems`: (P, n) rows back to the leaf's shape."""
        if self.transposed:
            return self.columns.from_problems(x, _flip(shape)).T
        if self.granularity == "tensor":
            return x.reshape(shape)
        return x.reshape(shape[-1], -1).T.reshape(shape)

    def to_dict(self) -> dict:
        return dict(layout=self.granularity, group=self.group_size)


def _flip(shape) -> tuple:
    shape = tuple(shape)
    if len(shape) != 2:
        raise ValueError(f"row layouts are for 2-D leaves, got shape {shape}")
    return shape[::-1]


@dataclasses.dataclass(frozen=True)
class Masked:
    """A leaf whose entries are exactly 0.0 where `mask` (bool, the leaf's shape) is False."""

    mask: np.ndarray


@dataclasses.dataclass(frozen=True)
class Grid:
    """Integer codes on a quantization grid.

    Attributes:
      codes: uint8, the leaf's shape.
      scale: float32, `layout.param_shape(leaf shape)`.
      zero: float32 of the same shape: integer-valued zero-point codes, or float minimums with `float_zero`.
      layout: the grid's layout.
      float_zero: value = code * scale + zero (a float minimum) instead of (code - zero) * scale.
    """

    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    layout: Layout
    float_zero: bool = False


@dataclasses.dataclass(frozen=True)
class Palette:
    """Indices into one table of values per problem.

    Attributes:
      indices: uint8, the leaf's shape.
      table: (P, k) float32, the values the forward pass uses (entries already rounded to their storage type).
      layout: how the P problems tile the leaf.
      keep: bool, the leaf's shape, False where the value is 0.0 whatever its index (None: all kept).
    """

    indices: np.ndarray
    table: np.ndarray
    layout: Layout
    keep: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Vectors:
    """Vector quantization: indices into one table of d-vectors per problem, summed over residual stages.

    Attributes:
      indices: uint8 (k <= 256) or uint16, (S, *vector_grid(leaf shape)): each stage's entry of every vector.
      table: (S, P, k, d) float32, the entries the forward pass uses (already rounded to their storage type).
      layout: "tensor", "channel" or "row" (`VECTOR_GRANULARITIES`): how the P problems tile the vector grid.
      keep: bool, the leaf's shape, False where the value is 0.0 whatever its vector's entries (None: all kept).
    """

    indices: np.ndarray
    table: np.ndarray
    layout: Layout
    keep: np.ndarray | None = None

    @property
    def dim(self) -> int:
        return int(np.shape(self.table)[-1])

    @property
    def stages(self) -> int:
        return int(np.shape(self.table)[0])


Code = Masked | Grid | Palette | Vectors
VECTOR_GRANULARITIES = ("tensor", "channel", "row")


def vector_grid(shape, layout: Layout, dim: int) -> tuple:
    """The shape of the grid of d-vectors of a leaf of `shape` (see the module docstring).

    Raises:
      ValueError: a layout vectors do not take, or an axis the vectors cut that `dim` does not divide.
    """
    shape = tuple(shape)
    if layout.granularity not in VECTOR_GRANULARITIES:
        raise ValueError(f"vectors take the layouts {VECTOR_GRANULARITIES}, not {layout.granularity!r}")
    if layout.transposed and len(shape) != 2:
        raise ValueError(f"row layouts are for 2-D leaves, got shape {shape}")
    if layout.granularity == "channel" and len(shape) < 2:
        raise ValueError(f"channel vectors need a kernel (in, out), got shape {shape}")
    axis = 1 if layout.transposed else 0
    if not shape or shape[axis] % dim:
        raise ValueError(f"vectors of {dim} do not tile axis {axis} of shape {shape}")
    return shape[:axis] + (shape[axis] // dim,) + shape[axis + 1 :]


def _leaf_shape(grid, layout: Layout, dim: int) -> tuple:
    axis = 1 if layout.transposed else 0
    return grid[:axis] + (grid[axis] * dim,) + grid[axis + 1 :]


def to_vectors(w, layout: Layout, dim: int):
    """A leaf as (P, m, d): the m vectors of each of its P problems, in the order of `Layout.to_problems` of the
    vector grid (NumPy or JAX, traceable)."""
    grid = vector_grid(w.shape, layout, dim)
    if layout.transposed:  # (rows, cols): row v's vectors are already consecutive
        return w.reshape(grid[0], grid[1], dim)
    g = _xp(w).moveaxis(w.reshape(grid[0], dim, *grid[1:]), 1, -1)  # (*grid, d)
    if layout.granularity == "tensor":
        return g.reshape(1, -1, dim)
    return g.reshape(-1, grid[-1], dim).transpose(1, 0, 2)  # (out, m, d): the columns of the last axis


def from_vectors(v, layout: Layout, shape):
    """Inverse of `to_vectors`: (P, m, d) back to a leaf of `shape`."""
    shape, dim = tuple(shape), v.shape[-1]
    grid = vector_grid(shape, layout, dim)
    if layout.transposed:
        return v.reshape(shape)
    g = v if layout.granularity == "tensor" else v.transpose(1, 0, 2)
    return _xp(v).moveaxis(g.reshape(*grid, dim), -1, 1).reshape(shape)


def vector_values(indices, table, layout: Layout, keep=None):
    """The float32 values of vector indices (S, *grid) into tables (S, P, k, d) (NumPy or JAX, traceable): the
    stages' entries summed in stage order, 0.0 where `keep` is False."""
    xp = _xp(table)
    n_stages, n_problems, _, dim = table.shape
    rows = xp.arange(n_problems)[:, None]
    acc = None
    for s in range(n_stages):
        idx = layout.to_problems(indices[s]).astype(np.int32)  # (P, m)
        e = table[s].astype(np.float32)[rows, idx]  # (P, m, d)
        acc = e if acc is None else acc + e
    out = from_vectors(acc, layout, _leaf_shape(tuple(indices.shape[1:]), layout, dim))
    return out if keep is None else xp.where(keep, out, xp.zeros((), out.dtype))


def grid_values(codes, scale, zero, layout: Layout, float_zero: bool = False):
    """Dequantized float32 values of grid codes (NumPy or JAX, traceable): the one formula every user shares."""
    s = layout.expand(scale.astype(np.float32), codes.shape)
    z = layout.expand(zero.astype(np.float32), codes.shape)
    c = codes.astype(np.float32)
    return c * s + z if float_zero else (c - z) * s


def palette_values(indices, table, layout: Layout, keep=None):
    """The float32 values of palette indices (NumPy or JAX); 0.0 where `keep` is False."""
    xp = _xp(table)
    rows = layout.to_problems(indices).astype(np.int32)  # (P, n)
    out = layout.from_problems(xp.take_along_axis(table.astype(np.float32), rows, axis=1), indices.shape)
    return out if keep is None else xp.where(keep, out, xp.zeros((), out.dtype))


def decode(code: Code, like: np.ndarray | None = None) -> np.ndarray:
    """A record's values as a NumPy array: float32 for grids, palettes and vectors, the dtype of `like` (the leaf it
    masks, which a Masked record needs) for masks."""
    if isinstance(code, Grid):
        return grid_values(*map(np.asarray, (code.codes, code.scale, code.zero)), code.layout, code.float_zero)
    if isinstance(code, Palette):
        keep = None if code.keep is None else np.asarray(code.keep)
        return palette_values(np.asarray(code.indices), np.asarray(code.table), code.layout, keep)
    if isinstance(code, Vectors):
        keep = None if code.keep is None else np.asarray(code.keep)
        return vector_values(np.asarray(code.indices), np.asarray(code.table), code.layout, keep)
    if isinstance(code, Masked):
        x = np.asarray(like)
        return np.where(np.asarray(code.mask), x, np.zeros((), x.dtype))
    raise TypeError(f"not a code record: {type(code).__name__}")


def same_bits(a, b) -> bool:
    """Whether two arrays hold the same bits (so -0.0 differs from +0.0 and a NaN equals itself)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    u = f"u{a.dtype.itemsize}" if a.dtype.kind == "f" else a.dtype
    return bool(np.array_equal(np.ascontiguousarray(a).view(u), np.ascontiguousarray(b).view(u)))


def describes(code: Code, leaf) -> bool:
    """Whether `code` gives exactly the values of `leaf` (bit for bit, in the leaf's dtype)."""
    leaf = np.asarray(leaf)
    values = decode(code, leaf)
    if values.shape != leaf.shape:
        return False
    return same_bits(values.astype(leaf.dtype), leaf)


def compose(earlier: Code | None, later: Code) -> Code:
    """The record of a leaf that `later` re-coded after `earlier` (a chain's members, in order).

    A mask over a grid with a zero code keeps the grid (the pruned entries take the zero code); a mask over a
    palette or vectors narrows its `keep`; otherwise the later record describes the values alone.
    """
    if not isinstance(later, Masked) or earlier is None:
        return later
    mask = np.asarray(later.mask)
    if isinstance(earlier, Grid) and not earlier.float_zero:
        zero = np.broadcast_to(earlier.layout.expand(np.asarray(earlier.zero), mask.shape), mask.shape)
        codes = np.where(mask, np.asarray(earlier.codes), zero.astype(np.uint8))
        return dataclasses.replace(earlier, codes=codes)
    if isinstance(earlier, Palette | Vectors):
        keep = mask if earlier.keep is None else mask & np.asarray(earlier.keep)
        return dataclasses.replace(earlier, keep=keep)
    return later


def to_numpy(codes: dict) -> dict:
    """{path: record} with every array of every record as NumPy (records from device arrays)."""

    def one(c):
        return dataclasses.replace(
            c,
            **{
                f.name: np.asarray(getattr(c, f.name))
                for f in dataclasses.fields(c)
                if isinstance(getattr(c, f.name), np.ndarray | jax.Array)
            },
        )

    return {p: one(c) for p, c in codes.items()}
