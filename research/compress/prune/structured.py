"""Structured pruning: remove whole attention heads and MLP neurons, the same number in every block, then `shrink`
the model into a smaller dense one of the same family.

    t = prune.structured.structured(heads=0.25, neurons=0.5, score="taylor")
    state = t.init(params, key, calib)
    masked = t.apply(params, state)                             # pruned units zeroed (what fine-tuning trains)
    cfg2, params2 = prune.structured.shrink(cfg, params, state)  # the same function, physically smaller

Units. An attention unit is one key/value group: kv head g and the H/KV query heads that read it (one head in plain
multi-head attention), i.e. the q columns of those query heads, the k and v columns of kv head g, their biases, and
the o rows of those query heads. An MLP unit (neuron f) is column f of up (and gate), their bias entries, and row f
of down. The masks zero all of it; the zero o and down rows alone already silence a unit exactly, whatever its
biases feed in (act(b) of a masked neuron meets a zero row), so the masked model and the shrunk one compute the same
function. The o and down biases are shared by all units and stay.

Counts follow `torch.nn.utils.prune`: pruning a fraction s of n units removes round(s * n) per block. Units are
ranked within each block (ties keep the earlier unit), so every block ends with the same n_head, n_kv_head and d_ff,
which `shrink` needs.

Scores (higher = kept):
  magnitude   L2 norm of all the unit's weights (kernels and biases); no data.
  taylor      first-order Taylor importance (Molchanov et al. 2019), |sum over the unit's weights of g * w|, summed
              over calibration batches; g is the gradient of the next-token loss (windows w: inputs w[:, :-1],
              targets w[:, 1:]).
  activation  L2 norm of the unit's outputs (the features entering o / down) over every calibration token, with
              each block fed the dense model's activations.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from research import errors, models, tree
from research.compress import calib as calib_lib
from research.compress import core
from research.compress.prune import masks
from research.models import config as model_config
from research.models import loss as loss_lib

SCORES = ("magnitude", "taylor", "activation")


class Layout(NamedTuple):
    """How a block's attention weights split into units.

    Attributes:
      n_kv: key/value heads, i.e. attention units per block.
      group: query heads per kv head (H / KV).
      head_dim: width of one head.
    """

    n_kv: int
    group: int
    head_dim: int


def layout(params, head_dim: int) -> Layout:
    """The attention `Layout` of a parameter tree whose heads are `head_dim` wide.

    Raises:
      UserError: head_dim does not divide the q / k widths, or the query heads do not split evenly over kv heads.
    """
    attn = blocks(params)[0]["attn"]
    q_out, kv_out = attn["q"]["kernel"].shape[1], attn["k"]["kernel"].shape[1]
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0:
        raise errors.UserError(f"head_dim must be a positive integer, got {head_dim!r}")
    if q_out % head_dim or kv_out % head_dim or (q_out // head_dim) % (kv_out // head_dim):
        raise errors.UserError(
            f"head_dim {head_dim} does not fit the attention weights (q width {q_out}, k width {kv_out})"
        )
    return Layout(kv_out // head_dim, q_out // kv_out, head_dim)


def blocks(params) -> list:
    """The per-block parameter trees, in order."""
    return [params["layers"][i] for i in sorted(params["layers"])]


def unit_sums(block, lay: Layout | None):
    """Sums a block tree of per-weight values (w**2, g*w, ...) over each unit's weights.

    Args:
      block: one block's tree (as `params["layers"][i]`) of arrays shaped like the weights.
      lay: the attention layout; None skips attention.

    Returns:
      (heads, neurons): (KV,) per attention unit (None without a layout) and (F,) per neuron.
    """
    heads = None
    if lay is not None:
        a, kv, width = block["attn"], lay.n_kv, lay.group * lay.head_dim
        heads = sum(x.reshape(-1, kv, width).sum((0, 2)) for x in a["q"].values())  # kernel (D, H*hd), bias (H*hd,)
        for name in ("k", "v"):
            heads += sum(x.reshape(-1, kv, lay.head_dim).sum((0, 2)) for x in a[name].values())
        heads += a["o"]["kernel"].reshape(kv, -1).sum(1)  # (H*hd, D): a unit's rows are contiguous
    m = block["mlp"]
    f = m["down"]["kernel"].shape[0]
    neurons = m["down"]["kernel"].sum(1)  # (F,)
    for name in ("up", "gate"):
        if name in m:
            neurons += sum(x.reshape(-1, f).sum(0) for x in m[name].values())
    return heads, neurons


def _stack(per_block):
    heads = None if per_block[0][0] is None else jnp.stack([h for h, _ in per_block])
    return heads, jnp.stack([n for _, n in per_block])


@functools.partial(jax.jit, static_argnums=1)
def _magnitude(params, lay):
    heads, neurons = _stack([unit_sums(jax.tree.map(jnp.square, b), lay) for b in blocks(params)])
    return None if heads is None else jnp.sqrt(heads), jnp.sqrt(neurons)


@functools.partial(jax.jit, static_argnums=(1, 3))
def _taylor_batch(params, graphdef, window, lay):
    batch = {"inputs": window[:, :-1], "targets": window[:, 1:]}
    grads = jax.grad(loss_lib.loss_fn)(params, graphdef, batch)
    gw = jax.tree.map(lambda g, w: g.astype(jnp.float32) * w.astype(jnp.float32), grads, params)
    heads, neurons = _stack([unit_sums(b, lay) for b in blocks(gw)])
    return None if heads is None else jnp.abs(heads), jnp.abs(neurons)


def _activation(params, lay: Layout | None, calib: calib_lib.Calibration):
    names = (["attn/o"] if lay is not None else []) + ["mlp/down"]
    paths = [f"layers/{i}/{n}/kernel" for i in sorted(params["layers"]) for n in names]
    out = {}

    def visit(i, stats, n_tokens, kernels):
        heads = None if lay is None else jnp.sqrt(stats["attn/o"].reshape(lay.n_kv, -1).sum(1))
        out[i] = (heads, jnp.sqrt(stats["mlp/down"]))
        return kernels

    calib_lib.walk(calib, params, paths, visit, stat="sqnorm", progress=False, desc="activation scores", records=(out,))
    return _stack([out[i] for i in sorted(out)])


def scores(params, score: str, lay: Layout | None, calib: calib_lib.Calibration | None = None):
    """Importance of every unit of every block.

    Args:
      params: the parameter tree.
      score: "magnitude", "taylor" or "activation".
      lay: the attention layout; None scores only the neurons.
      calib: calibration windows (taylor and activation need them).

    Returns:
      (heads, neurons): (n_layer, KV) float32 (None without a layout) and (n_layer, F) float32.
    """
    if score == "magnitude":
        return _magnitude(params, lay)
    calib = calib_lib.require(calib, f"structured pruning with score={score!r}")
    if score == "activation":
        return _activation(params, lay, calib)
    heads, neurons = None, 0.0
    for window in calib.batches():
        h, n = _taylor_batch(params, calib.graphdef, window, lay)
        heads, neurons = (h if heads is None else heads + h), neurons + n
    return heads, neurons


def _n_keep(n: int, fraction: float, what: str) -> int:
    keep = n - masks.n_pruned(fraction, n)
    if keep == 0:
        raise errors.UserError(
            f"removing a fraction {fraction} of the {n} {what} per block removes all of them; use a smaller fraction"
        )
    return keep


def _kept(unit_scores, n_keep: int):
    """(n_layer, U) scores -> ((n_layer, U) bool keep, (n_layer, n_keep) int32 ascending kept indices)."""
    keep = masks.keep_top(unit_scores, n_keep)
    return keep, jnp.argsort(~keep, axis=-1, stable=True)[:, :n_keep].astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _select(params, head_scores, neuron_scores, lay: Layout | None, keep_h: int | None, keep_n: int | None):
    """({path: bool mask}, (n_layer, keep_h) kept heads or None, (n_layer, keep_n) kept neurons or None)."""
    head_mask, head_idx = _kept(head_scores, keep_h) if keep_h is not None else (None, None)
    neuron_mask, neuron_idx = _kept(neuron_scores, keep_n) if keep_n is not None else (None, None)
    values = {}
    for row, i in enumerate(sorted(params["layers"])):
        kh = None if head_mask is None else head_mask[row]
        kn = None if neuron_mask is None else neuron_mask[row]
        values.update(_block_masks(i, params["layers"][i], kh, kn, lay))
    return values, head_idx, neuron_idx


def _block_masks(i: int, block, keep_heads, keep_neurons, lay: Layout | None) -> dict:
    """{path: bool mask} of block i: keep_heads (KV,) or None, keep_neurons (F,) or None."""
    out = {}
    if keep_heads is not None:
        width = lay.group * lay.head_dim
        cols = {"q": jnp.repeat(keep_heads, width), "k": jnp.repeat(keep_heads, lay.head_dim)}
        cols["v"] = cols["k"]
        for name, col in cols.items():
            for leaf, x in block["attn"][name].items():
                out[f"layers/{i}/attn/{name}/{leaf}"] = jnp.broadcast_to(col, x.shape)
        o = block["attn"]["o"]["kernel"]
        out[f"layers/{i}/attn/o/kernel"] = jnp.broadcast_to(cols["q"][:, None], o.shape)
    if keep_neurons is not None:
        m = block["mlp"]
        for name in ("up", "gate"):
            for leaf, x in m.get(name, {}).items():
                out[f"layers/{i}/mlp/{name}/{leaf}"] = jnp.broadcast_to(keep_neurons, x.shape)
        out[f"layers/{i}/mlp/down/kernel"] = jnp.broadcast_to(keep_neurons[:, None], m["down"]["kernel"].shape)
    return out


def structured(
    heads: float = 0.0, neurons: float = 0.5, *, score: str = "magnitude", head_dim: int | None = None
) -> core.Transform:
    """Structured pruning of attention units and MLP neurons as a static mask transform.

    Args:
      heads: fraction of the attention units (kv groups; heads in plain multi-head attention) to remove per block.
      neurons: fraction of the MLP neurons to remove per block.
      score: "magnitude", "taylor" or "activation" (see the module docstring).
      head_dim: width of one head; needed to prune heads, unless init gets calibration data (whose graphdef holds
        the model config).

    Returns:
      A Transform whose state is {"masks": bool masks of the full weight shapes at the touched leaves (None
      elsewhere), "keep": {"heads": (n_layer, kept) int32 kv-head indices or None, "neurons": (n_layer, kept)
      int32 or None}}, ascending indices of the kept units; None where that fraction is 0 (nothing touched).
    """
    heads = masks.check_sparsity(heads, "heads")
    neurons = masks.check_sparsity(neurons, "neurons")
    if score not in SCORES:
        raise errors.UserError(f"structured pruning score must be one of {SCORES}, got {score!r}")

    def init(params, key, calib):
        lay, keep_h = None, None
        if heads > 0:
            width = head_dim
            if width is None and calib is not None:
                width = models.merge(calib.graphdef, params).cfg.dim_head
            if width is None:
                raise errors.UserError(
                    "pruning heads needs the head width: pass head_dim=cfg.dim_head to structured() "
                    "(or give init calibration data)"
                )
            lay = layout(params, width)
            keep_h = _n_keep(lay.n_kv, heads, "attention heads (kv groups)")
        f = blocks(params)[0]["mlp"]["down"]["kernel"].shape[0]
        keep_n = _n_keep(f, neurons, "MLP neurons") if neurons > 0 else None
        head_scores, neuron_scores = scores(params, score, lay, calib)  # (n_layer, KV), (n_layer, F)
        values, head_idx, neuron_idx = _select(params, head_scores, neuron_scores, lay, keep_h, keep_n)
        return {"masks": core.touched_tree(params, values), "keep": {"heads": head_idx, "neurons": neuron_idx}}

    return core.Transform(init, lambda params, state: core.apply_masks(params, state["masks"]), masks=_masks)


def _masks(state):
    return state["masks"]


def _gather(block, head_idx, neuron_idx, lay: Layout) -> dict:
    """One block's weights restricted to the kept units (numpy index arrays, or None to keep all)."""
    out = {k: {n: dict(v) for n, v in part.items()} if k in ("attn", "mlp") else part for k, part in block.items()}
    if head_idx is not None:
        attn, width = out["attn"], lay.group * lay.head_dim
        for name, w in (("q", width), ("k", lay.head_dim), ("v", lay.head_dim)):
            for leaf, x in attn[name].items():
                x = x.reshape(*x.shape[:-1], lay.n_kv, w)[..., head_idx, :]
                attn[name][leaf] = x.reshape(*x.shape[:-2], -1)
        o = attn["o"]["kernel"]
        attn["o"]["kernel"] = o.reshape(lay.n_kv, width, -1)[head_idx].reshape(-1, o.shape[-1])
    if neuron_idx is not None:
        mlp = out["mlp"]
        for name in ("up", "gate"):
            for leaf, x in mlp.get(name, {}).items():
                mlp[name][leaf] = x[..., neuron_idx]
        mlp["down"]["kernel"] = mlp["down"]["kernel"][neuron_idx]
    return out


def _check_indices(idx, n_layer: int, n: int, what: str):
    if idx is None:
        return None
    idx = np.asarray(idx)
    ok = idx.ndim == 2 and idx.shape[0] == n_layer and 0 < idx.shape[1] <= n
    ok = ok and bool(np.all((idx >= 0) & (idx < n))) and bool(np.all(np.diff(idx, axis=1) > 0))
    if not ok:
        raise errors.UserError(f"structured state: kept {what} must be (n_layer={n_layer}, k <= {n}) ascending indices")
    return idx


def shrink(cfg: model_config.ModelConfig, params, state):
    """Physically removes the pruned units: a smaller dense model computing what the masked model computes.

    Heads and kv heads shrink together (the query heads per kv head stay), head_dim is set explicitly to the old
    head width, d_ff shrinks to the kept neurons. A GPT-2 (or OPT / GPT-NeoX) model that lost heads has
    n_head * head_dim < d_model, which those Hugging Face families cannot express; Llama-family models export.

    Args:
      cfg: the model's config.
      params: the parameter tree of `cfg` (dense; the state's masks are applied first).
      state: a `structured` state.

    Returns:
      (new_cfg, new_params), new_params shaped as `models.abstract(new_cfg)`.
    """
    want = {p: tuple(a.shape) for p, a in tree.flatten(models.abstract(cfg)[1]).items()}
    got = {p: tuple(np.shape(a)) for p, a in tree.flatten(params).items()}
    if want != got:
        bad = sorted(p for p in set(want) | set(got) if want.get(p) != got.get(p))
        raise errors.UserError(f"shrink: params do not match the config (first difference at {bad[0]})")
    lay = Layout(cfg.kv_heads, cfg.n_head // cfg.kv_heads, cfg.dim_head)
    head_idx = _check_indices(state["keep"]["heads"], cfg.n_layer, lay.n_kv, "heads")
    neuron_idx = _check_indices(state["keep"]["neurons"], cfg.n_layer, cfg.ff_dim, "neurons")
    params = core.apply_masks(params, state["masks"])
    layers = {}
    for row, i in enumerate(sorted(params["layers"])):
        h = None if head_idx is None else head_idx[row]
        n = None if neuron_idx is None else neuron_idx[row]
        layers[i] = _gather(params["layers"][i], h, n, lay)
    changes = {}
    if head_idx is not None:
        kv = head_idx.shape[1]
        changes.update(n_head=kv * lay.group, head_dim=cfg.dim_head)
        changes["n_kv_head"] = None if cfg.n_kv_head is None else kv
    if neuron_idx is not None:
        changes["d_ff"] = neuron_idx.shape[1]
    return cfg.replace(**changes), {**params, "layers": layers}
