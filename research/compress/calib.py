"""Calibration data and the layer-by-layer walk that calibration-based methods share (Wanda, SparseGPT, GPTQ).

Calibration data are N windows of L tokens drawn deterministically from a training split (the papers use
128 x 2048 from C4; L is capped by the model's context). `walk` runs the calibration windows through the model one
block at a time: it records the inputs of the block's linear layers (as statistics: X^T X or per-feature squared
norms, summed over every calibration token), lets the method rewrite the block's weights, then runs the block again
with its new weights to produce the next block's input, so that every block is calibrated on the outputs of the
already-compressed blocks before it (as in the SparseGPT and Wanda reference code).

Under a mesh (`Calibration(..., mesh=m)`: the compress config's mesh when it has more than one device, or a
multi-process run) each calibration batch is split over the mesh's "data" axis (each process puts only its own
rows) and the parameters are replicated, so the activations of a batch are spread over the devices, and over the
hosts; the statistics (X^T X, squared norms, gradients) are sums over the batch, which XLA reduces across the
devices, and equal the one-device ones to float32 rounding (tested, and in two processes).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from research import errors, models
from research.compress import journal as journal_lib
from research.models import loss as loss_lib
from research.models import transformer
from research.parallel import distributed, sharding

STATS = ("hessian", "sqnorm")
_BLOCK_PATH = re.compile(r"layers/(\d+)/((?:attn|mlp)/\w+)/kernel")
# The leaves that map the final hidden states to logits: an untied head's kernel (D, V), a tied embedding (V, D).
HEAD_PATHS = ("lm_head/kernel", "embed/embedding")


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Calibration windows for a model.

    Attributes:
      graphdef: the model's graphdef (from `models.split`).
      inputs: (N, L) int32 token windows.
      batch_size: windows per forward pass.
    """

    graphdef: Any
    inputs: np.ndarray
    batch_size: int = 8
    mesh: Any = None  # a device mesh: batches split over its "data" axis, parameters replicated (None: one device)
    # Where the walks journal their finished blocks (`compress.journal`), one subdirectory per walk in call order;
    # None: nothing is saved. The compress pipeline points it into its `.partial` directory.
    journal: Path | None = None
    _walks: list = dataclasses.field(default_factory=list, repr=False, compare=False)

    def __post_init__(self):
        if self.mesh is not None and self.batch_size % self.mesh.shape["data"]:
            raise errors.UserError(
                f"calibration.batch_size={self.batch_size} is not divisible by the mesh's {self.mesh.shape['data']} "
                "data devices"
            )

    def place(self, x):
        """A batch-leading array on the calibration devices (split over "data" under a mesh; every process holds
        the whole array and puts only its own rows)."""
        if self.mesh is None:
            return jnp.asarray(x)
        return distributed.put_rows(np.asarray(x), NamedSharding(self.mesh, P("data")))

    def replicate(self, tree):
        """Parameters on every device of the mesh (unchanged without one)."""
        return tree if self.mesh is None else sharding.replicate(tree, self.mesh)

    def journal_for(self, desc: str):
        """The journal of the next walk (`<journal>/<nn>-<desc>`), or None without a journal directory."""
        self._walks.append(desc)
        if self.journal is None:
            return None
        return journal_lib.Journal(Path(self.journal) / f"{len(self._walks) - 1:02d}-{desc.replace(' ', '-')}")

    def batches(self):
        for i in range(0, len(self.inputs), self.batch_size):
            yield self.place(self.inputs[i : i + self.batch_size])


def sample(tokens: np.ndarray, n: int = 128, length: int = 2048, seed: int = 0, max_len: int | None = None):
    """N windows of `length` tokens at uniformly random starts (a function of the seed only).

    Args:
      tokens: the token stream of a training split.
      n: number of windows.
      length: tokens per window, capped at `max_len` (the model's context).
      seed: the sampling seed.
      max_len: the model's maximum sequence length.

    Returns:
      (n, length) int32 array.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise errors.UserError(f"calibration needs a positive number of windows, got {n!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
        raise errors.UserError(f"calibration window length must be a positive integer, got {length!r}")
    length = min(length, max_len) if max_len else length
    tokens = np.asarray(tokens)
    if len(tokens) <= length:
        raise errors.UserError(
            f"the calibration split has {len(tokens)} tokens, too few for windows of {length}; use a shorter length"
        )
    starts = np.random.default_rng(seed).integers(0, len(tokens) - length, n)
    return np.stack([tokens[s : s + length] for s in starts]).astype(np.int32)


def require(calib: Calibration | None, method: str) -> Calibration:
    if calib is None:
        raise errors.UserError(f"{method} needs calibration data: give the pipeline a calibration section (n, length)")
    return calib


def gradients(calib: Calibration, params, square: bool = False):
    """Mean over the calibration batches of the next-token loss gradient (or of its square), weighted by batch size.

    Every window token but the first is a target. With square=True this is the square of each batch's *mean*
    gradient, averaged over batches: a diagonal Fisher estimate at batch granularity (one backward pass per batch),
    not the per-sample empirical Fisher (the mean of each window's squared gradient), which it underestimates where
    the windows' gradients disagree; `calibration.batch_size=1` makes it the per-window empirical Fisher.

    Returns:
      A float32 tree like params.
    """
    grad_fn = jax.jit(jax.grad(lambda p, b: loss_lib.loss_fn(p, calib.graphdef, b)))
    params = calib.replicate(params)
    total, n = None, 0
    for batch in calib.batches():
        g = grad_fn(params, {"inputs": batch[:, :-1], "targets": batch[:, 1:]})
        w = batch.shape[0]  # each batch's gradient is a mean over its windows
        g = jax.tree.map(lambda x, w=w: (x.astype(jnp.float32) ** 2 if square else x.astype(jnp.float32)) * w, g)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
        n += w
    return jax.tree.map(lambda x: x / n, total)


def fisher(calib: Calibration, params):
    """The diagonal empirical Fisher of the next-token loss (see `gradients`)."""
    return gradients(calib, params, square=True)


def block_targets(paths) -> dict[int, list[str]]:
    """{block index: ["attn/q", ...]} for paths like "layers/3/attn/q/kernel" (head paths are skipped: `walk`
    calibrates them after the last block)."""
    out: dict[int, list[str]] = {}
    for p in paths:
        m = _BLOCK_PATH.fullmatch(p)
        if m is None and p in HEAD_PATHS:
            continue
        if m is None:
            raise errors.UserError(
                f"{p} is not a linear kernel inside a block or the output head; layer-wise methods handle only those"
            )
        out.setdefault(int(m.group(1)), []).append(m.group(2))
    return out


ATTN_CHUNK = 256  # queries per attention chunk while calibrating (as eval.metrics.ATTN_CHUNK)


def _stat(x, kind):
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)  # (N*L, in)
    if kind == "hessian":
        return jnp.dot(x.T, x, precision=jax.lax.Precision.HIGHEST)  # (in, in)
    return jnp.sum(x * x, axis=0)  # (in,)


@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef, params, tokens, positions):
    return models.merge(graphdef, params).embed_tokens(tokens, positions)  # (B, L, D)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _final_stat(graphdef, params, x, kind):
    """The statistic of the head's input: the final-normed hidden states of the last block's output x."""
    return _stat(models.merge(graphdef, params).final_norm(x), kind)


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _run_block(block_def, block_params, x, positions, kind, names=()):
    """The block's output, and the statistic of the inputs of the linear layers in `names` (static)."""
    block = nnx.merge(block_def, block_params)
    with transformer.tap_inputs() as taps:
        # Attention a chunk of queries at a time: at 128 x 2048 tokens the full (B, H, L, L) scores would dominate.
        y, _ = block(x, positions, attn_chunk=ATTN_CHUNK if x.shape[1] > ATTN_CHUNK else None)
    computed: dict[int, jax.Array] = {}  # q, k and v read the same input: one statistic for the three
    stats = {}
    for name in names:
        t = taps[name]
        if id(t) not in computed:
            computed[id(t)] = _stat(t, kind)
        stats[name] = computed[id(t)]
    return y, stats


def walk(
    calib: Calibration,
    params,
    paths,
    visit: Callable,
    stat: str = "hessian",
    progress: bool | None = None,
    desc: str = "calibrate",
    head: Callable | None = None,
    records: tuple = (),
):
    """Walks the blocks in order, calibrating each on the outputs of the already-rewritten blocks before it.

    Args:
      calib: the calibration windows and the model's graphdef.
      params: the parameter tree.
      paths: the selected kernel paths ("layers/{i}/{attn|mlp}/{name}/kernel"); blocks without one are only run.
      visit: (block index, {name: statistic summed over tokens}, number of tokens, {name: kernel}) ->
        {name: new kernel}; names are "attn/q", "mlp/down", ...; the statistic is (in, in) X^T X for
        "hessian" and (in,) sum of squares per input feature for "sqnorm".
      stat: "hessian" or "sqnorm".
      progress: show a progress bar (None: only on a terminal).
      desc: the progress bar's label.
      head: None, or (statistic of the final-normed hidden states, number of tokens) -> None, called after every
        block has been rewritten and run: the head's input statistic (an untied `lm_head` kernel's, or a tied
        embedding's used as the head), computed on the outputs of the compressed blocks.
      records: the dicts `visit` writes its per-block results into (codes, masks, ...). With a journal
        (`Calibration.journal`) each finished block's new kernels and new record entries are saved, and a rerun
        replays them instead of visiting the block again (`compress.journal`): an interrupted compress continues
        at its first unfinished block, with the same result bit for bit.

    Returns:
      params with the kernels `visit` returned.
    """
    if stat not in STATS:
        raise ValueError(f"stat must be one of {STATS}")
    book = calib.journal_for(desc) if jax.process_count() == 1 else None  # one process writes and reads it
    targets = block_targets(paths)
    model = models.merge(calib.graphdef, params)
    block_def = nnx.split(model.layers[0], nnx.Param)[0]
    params = calib.replicate(params)
    batches = list(calib.batches())
    positions = [calib.place(np.broadcast_to(np.arange(b.shape[1], dtype=np.int32), b.shape)) for b in batches]
    xs = [_embed(calib.graphdef, params, b, p) for b, p in zip(batches, positions)]
    layers = {**params["layers"]}
    n_tokens = int(calib.inputs.size)
    # blocks after the last selected one are not run (their outputs feed nothing) unless the head is calibrated
    last = len(layers) - 1 if head is not None else max(targets, default=-1)
    for i in tqdm(range(last + 1), desc=desc, disable=None if progress is None else not progress):
        names = targets.get(i, [])
        if names:
            kernels = {name: _get(layers[i], name) for name in names}
            made_from = journal_lib.key(kernels, stat) if book is not None else None
            saved = book.get(i, made_from) if book is not None else None
            if saved is not None:  # finished before an interruption: replayed, not recomputed
                new, entries = saved
                for record, entry in zip(records, entries):
                    record.update(entry)
            else:
                total: dict = {}
                for x, pos in zip(xs, positions):
                    _, stats = _run_block(block_def, layers[i], x, pos, stat, tuple(sorted(names)))
                    for name in names:
                        total[name] = stats[name] if name not in total else total[name] + stats[name]
                before = [set(record) for record in records]
                new = visit(i, total, n_tokens, kernels)
                if book is not None:
                    entries = [{k: v for k, v in record.items() if k not in b} for record, b in zip(records, before)]
                    book.put(i, made_from, (new, entries))
            layers[i] = calib.replicate(_set(layers[i], new))
        if i < last or head is not None:
            xs = [_run_block(block_def, layers[i], x, pos, None)[0] for x, pos in zip(xs, positions)]  # propagate
    out = {**params, "layers": layers}
    if head is not None:
        head(sum(_final_stat(calib.graphdef, out, x, stat) for x in xs), n_tokens)
    return out


def _get(block_params, name):
    part, lin = name.split("/")
    return block_params[part][lin]["kernel"]


def _set(block_params, kernels: dict):
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in block_params.items()}
    for name, kernel in kernels.items():
        part, lin = name.split("/")
        out[part][lin] = {**out[part][lin], "kernel": kernel}
    return out
