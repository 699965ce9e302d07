"""Next-token loss: per-token NLL from logits, or from final hidden states a chunk of positions at a time.

It lives under `models/` (which imports nothing from `train/`, `compress/` or `eval/`) so that evaluation
(`eval.metrics`), training (`train.step`, which re-exports `token_nll`) and calibration can all use it.

`chunked_nll` never holds the full (B, T, V) logits: it maps the output head over chunks of `chunk` positions
(`jax.lax.map`), so at most (B, chunk, V) float32 logits exist at once. For SmolLM2-135M (V = 49,152) at window
2048 and batch 4, the full logits are 1.6 GB; `auto_chunk`'s 85 positions are 64 MiB (16 MiB at batch 1). Each
chunk's NLL is the same log-sum-exp as `token_nll`, so the result equals the unchunked one to float32 rounding.
Chunking is over positions only (each chunk sees the whole vocabulary), which bounds the logits at (B, chunk, V) for
any vocabulary size.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

# Logit elements (rows x vocab) per chunk that `auto_chunk` aims for: 2**24 float32 values are 64 MiB.
LOGITS_BUDGET = 2**24
MIN_BATCH = 4


def token_nll(logits, targets):
    """Per-token negative log-likelihood in nats: logits (..., V), targets (...) -> (...), float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def loss_fn(params, graphdef, batch, dropout_rng=None, apply_fn: Callable | None = None):
    """Mean next-token cross-entropy (nats per token) of a batch: the training loss, also what calibration
    (Fisher, structured pruning's gradients) differentiates.

    Args:
      params: parameter tree.
      graphdef: the model's graphdef from `models.split`.
      batch: {"inputs": (B, T) int, "targets": (B, T) int}.
      dropout_rng: PRNG key enabling dropout, or None.
      apply_fn: maps params to the effective parameters the forward pass sees (a compression transform's
        apply); None uses params as they are.

    Returns:
      Scalar float32 loss.
    """
    effective = apply_fn(params) if apply_fn is not None else params
    model = nnx.merge(graphdef, effective)
    logits = model(batch["inputs"], dropout_rng=dropout_rng)  # (B, T, V)
    return token_nll(logits, batch["targets"]).mean()


def auto_chunk(batch: int, length: int, vocab: int, budget: int = LOGITS_BUDGET) -> int:
    """Positions per chunk so that one chunk's (batch, chunk, vocab) logits hold about `budget` elements.

    Args:
      batch, length, vocab: the shape of the logits that would be computed at once.
      budget: logit elements per chunk.

    Returns:
      A chunk length in 1 .. length (length itself when everything fits). The chunk is sized as though the batch
      were at least MIN_BATCH: a smaller batch holds a fraction of the budget, since the positions per chunk (the
      loop's trip count), not its rows, set the chunked loop's overhead (SmolLM2-135M at batch 1: 85 positions,
      16 MiB of logits, as fast as 341 and 20 MiB less memory; benchmarks/eval_memory.py).
    """
    return max(1, min(length, budget // max(1, max(batch, MIN_BATCH) * vocab)))


def chunked_agreement(head: Callable, hidden, ref_head: Callable, ref_hidden, chunk: int):
    """Per-token KL(reference || model) in nats and top-1 agreement, `chunk` positions at a time.

    Args:
      head, hidden: the model's head and (B, T, D) final hidden states.
      ref_head, ref_hidden: the reference model's (the dense one), same B and T.
      chunk: positions per chunk (>= 1).

    Returns:
      (kl, agree): (B, T) float32 nats sum_v p_ref log(p_ref / p) and (B, T) bool (same argmax).
    """
    b, t, _ = hidden.shape
    chunk = min(chunk, t)
    n = -(-t // chunk)
    pad = n * chunk - t

    def split(h):
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0))) if pad else h
        return h.reshape(b, n, chunk, h.shape[-1]).swapaxes(0, 1)  # (N, B, C, D)

    def one(args):
        h, r = args
        logp = jax.nn.log_softmax(head(h).astype(jnp.float32), -1)  # (B, C, V)
        logq = jax.nn.log_softmax(ref_head(r).astype(jnp.float32), -1)
        kl = jnp.sum(jnp.exp(logq) * (logq - logp), -1)
        return jnp.maximum(kl, 0.0), jnp.argmax(logp, -1) == jnp.argmax(logq, -1)

    kl, agree = jax.lax.map(one, (split(hidden), split(ref_hidden)))  # (N, B, C) each
    return (a.swapaxes(0, 1).reshape(b, n * chunk)[:, :t] for a in (kl, agree))


def chunked_nll(head: Callable, hidden, targets, chunk: int):
    """Per-token NLL and argmax correctness from final hidden states, `chunk` positions at a time.

    Args:
      head: maps hidden states (B, C, D) to float32 logits (B, C, V) (a model's `head`).
      hidden: (B, T, D) final hidden states (a model's `hidden`).
      targets: (B, T) int target token ids.
      chunk: most positions per chunk (>= 1); T need not be a multiple (the chunks are evened out, the last padded
        and trimmed).

    Returns:
      (nll, correct): (B, T) float32 nats and (B, T) bool (the target is the logits' argmax).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    b, t, d = hidden.shape
    if chunk >= t:  # one chunk: the plain path
        logits = head(hidden).astype(jnp.float32)  # (B, T, V)
        return token_nll(logits, targets), jnp.argmax(logits, -1) == targets
    n = -(-t // chunk)
    chunk = -(-t // n)  # the same number of chunks, as even as possible: the least padding
    pad = n * chunk - t
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hs = hidden.reshape(b, n, chunk, d).swapaxes(0, 1)  # (N, B, C, D)
    ts = targets.reshape(b, n, chunk).swapaxes(0, 1)  # (N, B, C)

    def one(args):
        h, tgt = args
        logits = head(h).astype(jnp.float32)  # (B, C, V)
        return token_nll(logits, tgt), jnp.argmax(logits, -1) == tgt

    nll, correct = jax.lax.map(one, (hs, ts))  # (N, B, C) each
    nll = nll.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
    correct = correct.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
    return nll, correct
