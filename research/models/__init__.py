"""Transformer language models: the config, the NNX module, and the split into (graphdef, params).

`params` is a plain nested dict of arrays (see `transformer` for its paths); `merge(graphdef, params)` gives back a
model. Training and compression work on `params` and merge inside the jitted function.
"""

from __future__ import annotations

import jax
from flax import nnx

from research.models import config, loss, transformer  # noqa: F401  (re-exported modules)


def create(cfg: config.ModelConfig, seed: int = 0) -> transformer.Transformer:
    """A randomly initialised model; the same seed gives the same weights."""
    return transformer.Transformer(cfg, rngs=nnx.Rngs(params=seed))


def split(model: nnx.Module):
    """Returns (graphdef, params) with params a plain nested dict of arrays."""
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def merge(graphdef, params) -> transformer.Transformer:
    """Rebuilds the model from `split`'s output (works inside jit on traced params)."""
    return nnx.merge(graphdef, params)


def init(cfg: config.ModelConfig, seed: int = 0):
    """(graphdef, params) of a freshly initialised model."""
    return split(create(cfg, seed))


def abstract(cfg: config.ModelConfig):
    """(graphdef, params as ShapeDtypeStructs) without allocating any weights."""
    model = nnx.eval_shape(lambda: create(cfg, 0))
    graphdef, params = split(model)
    return graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
