"""Device mesh and shardings given by rules over parameter paths.

The mesh has two axes, "data" and "model". A rule set is a list of (regex, spec) pairs: the first regex that
matches a parameter's path ("layers/0/attn/q/kernel") gives its PartitionSpec, and unmatched leaves are
replicated. A dimension that the mesh axis does not divide stays unsharded. Presets:

  "replicated"  plain data parallelism: every parameter on every device, the batch split over all of them.
  "fsdp"        fully sharded data parallelism: matrices split along their first dimension over "model", the batch
                split over ("data", "model"); XLA gathers each weight where it is used.
  "tensor"      Megatron-style tensor parallelism over "model": q/k/v/up/gate column-parallel, o/down row-parallel,
                embeddings split over the vocabulary; the batch split over "data".

Optimizer state leaves inherit the sharding of the parameter whose path they end with (Adam's mu and nu mirror the
parameters), so the same rules shard the whole training state. With one device every spec is trivial and the same
code runs unsharded.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from research import errors, tree

AXES = ("data", "model")

PRESETS = {
    "replicated": [],
    "fsdp": [(r"(kernel|embedding)$", ("model", None))],
    "tensor": [
        (r"attn/(q|k|v)/kernel$", (None, "model")),
        (r"attn/(q|k|v)/bias$", ("model",)),
        (r"attn/o/kernel$", ("model", None)),
        (r"mlp/(up|gate)/kernel$", (None, "model")),
        (r"mlp/(up|gate)/bias$", ("model",)),
        (r"mlp/down/kernel$", ("model", None)),
        (r"(embed|pos_embed)/embedding$", ("model", None)),
        (r"lm_head/kernel$", (None, "model")),
    ],
}
BATCH_AXES = {"replicated": ("data", "model"), "fsdp": ("data", "model"), "tensor": ("data",)}


def make_mesh(data: int = -1, model: int = 1, devices=None) -> jax.sharding.Mesh:
    """A ("data", "model") mesh; -1 for `data` takes all devices left after `model`."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if model <= 0 or n % model:
        raise errors.UserError(f"mesh.model={model} must be positive and divide the {n} available devices")
    if data == -1:
        data = n // model
    if data <= 0 or data * model > n:
        raise errors.UserError(f"mesh {data} x {model} needs {data * model} devices, but {n} are available")
    if jax.process_count() > 1 and data * model != n:
        raise errors.UserError(
            f"mesh {data} x {model} leaves out devices of a {jax.process_count()}-process run; its mesh must span "
            f"all {n} devices: set mesh.data=-1 (every device not on the model axis)"
        )
    grid = np.asarray(devices[: data * model]).reshape(data, model)
    return jax.sharding.Mesh(grid, AXES)


def rules_for(rules) -> list[tuple[str, tuple]]:
    """A preset name or an explicit list of (regex, spec) pairs, as a list of pairs."""
    if isinstance(rules, str):
        if rules not in PRESETS:
            raise errors.UserError(f"unknown sharding rules {rules!r}; presets: {sorted(PRESETS)}")
        return PRESETS[rules]
    return [(str(r), tuple(s)) for r, s in rules]


def batch_axes_for(rules) -> tuple[str, ...]:
    return BATCH_AXES.get(rules, ("data",)) if isinstance(rules, str) else ("data",)


def _fit(spec: tuple, shape: tuple, mesh) -> P:
    """The spec, padded to the array's rank, with axes that do not divide their dimension dropped."""
    spec = tuple(spec)[: len(shape)] + (None,) * max(0, len(shape) - len(spec))
    out = []
    for dim, axis in zip(shape, spec):
        names = (axis,) if isinstance(axis, str) else tuple(axis or ())
        size = _devices_along(mesh, names)
        out.append(axis if names and dim % size == 0 else None)
    return P(*out)


def param_specs(params, rules, mesh) -> dict:
    """PartitionSpecs for a parameter tree, by the first matching rule on each path."""
    compiled = [(re.compile(r), s) for r, s in rules_for(rules)]

    def spec(path, leaf):
        for regex, s in compiled:
            if regex.search(path):
                return _fit(s, leaf.shape, mesh)
        return P()

    return tree.map_with_path(spec, params)


def named(specs, mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def mirror(target, params, param_shardings, mesh):
    """Shardings for a tree whose leaves end with parameter paths (optimizer state, a compression transform's
    state), by suffix match: a leaf of its parameter's shape (Adam's moments, a mask, integer codes) is sharded
    like it; a leaf of the same rank but other sizes (per-channel or per-group scales and zero points) keeps the
    parameter's mesh axis on each dimension whose size equals the parameter's; everything else (codebooks,
    scalars, schedules) is replicated."""
    by_path = {
        p: (leaf.shape, s)
        for (p, leaf), s in zip(
            tree.flatten(params).items(),
            jax.tree.leaves(param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding)),
        )
    }
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        parts, shape = path.split("/"), getattr(leaf, "shape", None)
        for i in range(len(parts)):
            hit = by_path.get("/".join(parts[i:]))
            if hit is None or shape is None:
                continue
            if hit[0] == shape:
                return hit[1]
            if len(hit[0]) == len(shape):
                spec = tuple(hit[1].spec) + (None,) * (len(shape) - len(hit[1].spec))
                kept = [a if d == pd else None for d, pd, a in zip(shape, hit[0], spec)]
                return NamedSharding(mesh, P(*kept))
        return replicated

    return tree.map_with_path(pick, target)


def batch_sharding(mesh, axes: tuple[str, ...]) -> NamedSharding:
    """Shards the leading (batch) dimension over `axes`."""
    return NamedSharding(mesh, P(axes))


def row_shards(batch_sh: NamedSharding) -> int:
    """How many parts a batch sharding (`batch_sharding`) cuts the rows of a batch into."""
    axes = batch_sh.spec[0] if len(batch_sh.spec) else None
    return _devices_along(batch_sh.mesh, (axes,) if isinstance(axes, str) else tuple(axes or ()))


def _devices_along(mesh, axes) -> int:
    return int(np.prod([mesh.shape[a] for a in axes]))


def replicate(tree, mesh):
    """Every array of `tree` on every device of `mesh`; arrays already laid out on the mesh's devices are kept."""
    devices = set(mesh.devices.flat)
    rep = NamedSharding(mesh, P())

    def one(x):
        if isinstance(x, jax.Array):
            if x.sharding.device_set == devices:
                return x
            if x.is_fully_addressable:  # this process's copy: every process puts its own (no cross-host transfer)
                x = np.asarray(x)
        return jax.device_put(x, rep)

    return jax.tree.map(one, tree)


def check_batch(batch_size: int, mesh, axes) -> None:
    shards = _devices_along(mesh, axes)
    if batch_size % shards:
        raise errors.UserError(
            f"batch size {batch_size} is not divisible by the {shards} devices it is split over (mesh axes {axes})"
        )
