"""One evaluation step run a block at a time: the embedding, each transformer block, then the final norm and the
head, each its own jitted call with only its own parameters as inputs.

    nll, correct = blockwise.step(graphdef, params, inputs, targets, mask, logits_chunk, attn_chunk)

The sums equal `metrics._eval_step`'s (the same modules on the same inputs). What changes is what is alive at
once: the whole-model step converts every parameter to the compute dtype up front, all of them live together, so
bf16 master weights (a checkpoint loaded as stored) cost their float32 copies besides themselves; here a block's
weights are converted inside that block's call and freed when it returns. So a bf16 Llama-3.2-1B evaluates with
its bf16 weights plus one block's float32 copies, and the parameters may be host arrays (NumPy, memory-mapped)
that reach the device one block at a time.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research import models


@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef, embed_params, tokens, positions):
    return models.merge(graphdef, embed_params).embed_tokens(tokens, positions)  # (B, T, D)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _block(block_def, block_params, x, positions, attn_chunk):
    y, _ = nnx.merge(block_def, block_params)(x, positions, attn_chunk=attn_chunk)
    return y  # (B, T, D)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _head(graphdef, head_params, x, targets, mask, logits_chunk):
    model = models.merge(graphdef, head_params)
    nll, correct = models.loss.chunked_nll(model.head, model.final_norm(x), targets, logits_chunk)  # (B, T) each
    return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(correct & mask)


def _without_layers(params: dict) -> dict:
    """The parameter tree with every block's leaves replaced by empty placeholders (what embed / head read)."""
    return {**params, "layers": jax.tree.map(lambda a: np.zeros((0,), np.float32), params["layers"])}


def step(graphdef, params, inputs, targets, mask, logits_chunk: int, attn_chunk: int):
    """(sum of NLL over the masked targets, number correct) of one batch, computed block by block.

    Args:
      graphdef, params: the model; params may be host (NumPy) or device arrays of any float dtype.
      inputs, targets, mask: (B, W) arrays as `metrics.windows` makes them.
      logits_chunk, attn_chunk: as in `metrics.evaluate` (already resolved to sizes).
    """
    model = models.merge(graphdef, params)
    block_def = nnx.split(model.layers[0], nnx.Param)[0]
    rest = _without_layers(params)
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32), inputs.shape)
    x = _embed(graphdef, rest, inputs, positions)
    for i in range(len(params["layers"])):
        x = _block(block_def, params["layers"][i], x, positions, attn_chunk)
    return _head(graphdef, rest, x, targets, mask, logits_chunk)
