"""The optimizer: AdamW with linear warmup and cosine decay, global-norm gradient clipping.

Weight decay applies to matrices (kernels and embeddings) only, not to biases and norm scales, as in nanoGPT.
"""

from __future__ import annotations

import jax
import optax


def schedule(t) -> optax.Schedule:
    """Linear warmup from 0 to `t.lr` over `t.warmup_steps`, then cosine decay to `t.min_lr` at `t.steps`."""
    warmup = min(t.warmup_steps, t.steps - 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=t.lr, warmup_steps=warmup, decay_steps=t.steps, end_value=t.min_lr
    )


def decay_mask(params):
    """True for the leaves weight decay applies to (two or more dimensions)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make(t) -> optax.GradientTransformation:
    """The optimizer for a config's `train` section."""
    return optax.chain(
        optax.clip_by_global_norm(t.grad_clip) if t.grad_clip else optax.identity(),
        optax.adamw(schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=decay_mask),
    )
