"""Evaluation: loss (nats per token), perplexity, bits per byte and next-token accuracy over windows.

Protocol. Tokens x_0 .. x_{n-1}; every x_t with t >= 1 is a target, scored exactly once. Windows hold `window`
tokens of input and start every `stride` tokens. The first window scores all of its targets; each later window
scores only the targets past the previous window's end, so with stride < window every scored token sees at least
window - stride tokens of context ("sliding window"), and with stride == window the windows do not overlap
("non-overlapping windows": the first target of each window sees one token of context).

The GPTQ/SparseGPT protocol (`Protocol.gptq(window)`), used by the published WikiText-2 perplexity tables: the
token stream is cut into n // window disjoint windows of `window` tokens (the last partial window is dropped), and
each window scores its tokens 1 .. window-1 (its first token is context only). Perplexity = exp(mean NLL), which
equals their exp(sum of window losses * window / (windows * window)) because every window scores the same count.

Bits per byte = total negative log2-likelihood / UTF-8 bytes of the scored targets (the tokenizer's `token_bytes`
table; for bytes it is one per token). Perplexity = exp(mean NLL per token).

Memory. The step never holds a batch's full (B, W, V) logits: the model returns final hidden states and
`models.loss.chunked_nll` scores them a chunk of positions at a time (about 64 MiB of logits), and when one layer's
(B, H, W, W) attention scores would pass 64 MiB the attention runs ATTN_CHUNK queries at a time
(`transformer.chunked_causal_attention`). Both equal the unchunked computation to float32 rounding; for SmolLM2-135M
at window 2048 see benchmarks/eval_memory.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from research import errors, hardware, models
from research.parallel import distributed
from research.parallel import sharding as sharding_lib

# Evaluation computes the attention ATTN_CHUNK queries at a time when one layer's (B, H, W, W) float32 scores
# would exceed ATTN_BUDGET elements (2**24: 64 MiB); see `evaluate` and benchmarks/eval_memory.py.
ATTN_CHUNK = 128
ATTN_BUDGET = 2**24


def auto_attn_chunk(batch: int, heads: int, window: int) -> int:
    """Queries per attention chunk for evaluation: ATTN_CHUNK when the full scores exceed ATTN_BUDGET, else the
    window (one chunk: the plain attention)."""
    return ATTN_CHUNK if batch * heads * window * window > ATTN_BUDGET else window


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Which tokens are scored with what context: `window`, `stride`, and `style` ("windows" or "gptq")."""

    window: int
    stride: int
    style: str = "windows"

    def __post_init__(self):
        if self.window <= 0 or not 0 < self.stride <= self.window:
            raise errors.UserError(f"eval window must be > 0 and 0 < stride <= window, got {self}")
        if self.style not in ("windows", "gptq"):
            raise errors.UserError(f"eval protocol must be 'windows' or 'gptq', got {self.style!r}")
        if self.style == "gptq" and (self.stride != self.window or self.window < 2):
            raise errors.UserError(
                f"the gptq protocol uses disjoint windows of >= 2 tokens (stride = window), got {self}"
            )

    @classmethod
    def gptq(cls, window: int) -> Protocol:
        return cls(window, window, "gptq")

    def describe(self) -> str:
        if self.style == "gptq":
            return (
                f"GPTQ/SparseGPT protocol: disjoint windows of {self.window} tokens, last partial window dropped, "
                "first token of each window unscored"
            )
        if self.stride == self.window:
            return f"non-overlapping windows of {self.window} tokens"
        return f"sliding windows of {self.window} tokens, stride {self.stride}"


def windows(tokens: np.ndarray, protocol: Protocol, max_windows: int | None = None):
    """Cuts tokens into evaluation windows.

    Returns:
      inputs (N, W) int32, targets (N, W) int32, mask (N, W) bool marking the targets each window scores.
    """
    n, w, s = len(tokens), protocol.window, protocol.stride
    if protocol.style == "gptq":
        return _gptq_windows(np.asarray(tokens), w, max_windows)
    if n < 2:
        raise errors.UserError(f"cannot evaluate {n} token(s): at least 2 are needed")
    count = 1 if n - 1 <= w else 1 + math.ceil((n - 1 - w) / s)
    if max_windows:
        count = min(count, max_windows)
    starts = np.arange(count) * s  # (N,)
    target_pos = starts[:, None] + 1 + np.arange(w)  # (N, W) absolute index of each target
    prev_end = np.concatenate([[0], starts[:-1] + w])  # last target index scored by the window before
    mask = (target_pos <= n - 1) & (target_pos > prev_end[:, None])
    pos = np.minimum(starts[:, None] + np.arange(w + 1), n - 1)  # (N, W+1)
    seq = np.asarray(tokens)[pos].astype(np.int32)
    return seq[:, :-1], seq[:, 1:], mask


def _gptq_windows(tokens: np.ndarray, w: int, max_windows: int | None):
    count = len(tokens) // w
    if max_windows:
        count = min(count, max_windows)
    if count == 0:
        raise errors.UserError(f"the gptq protocol needs at least one full window of {w} tokens, got {len(tokens)}")
    seq = tokens[: count * w].reshape(count, w).astype(np.int32)  # (N, W)
    targets = np.concatenate([seq[:, 1:], np.zeros((count, 1), np.int32)], axis=1)
    mask = np.ones((count, w), bool)
    mask[:, -1] = False
    return seq, targets, mask


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _eval_step(graphdef, params, inputs, targets, mask, logits_chunk, attn_chunk):
    model = models.merge(graphdef, params)
    if attn_chunk is None:
        attn_chunk = auto_attn_chunk(inputs.shape[0], model.cfg.n_head, inputs.shape[1])
    hidden = model.hidden(inputs, attn_chunk=attn_chunk)  # (B, W, D)
    if logits_chunk is None:
        logits_chunk = models.loss.auto_chunk(*inputs.shape, model.cfg.vocab_size)
    nll, correct = models.loss.chunked_nll(model.head, hidden, targets, logits_chunk)  # (B, W) each
    return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(correct & mask)


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8))
def _agree_step(graphdef, params, inputs, targets, mask, ref_params, ref_graphdef, logits_chunk, attn_chunk):
    """`_eval_step`'s sums and the KL / top-1 agreement sums against the reference, from one forward of each."""
    model, ref = models.merge(graphdef, params), models.merge(ref_graphdef, ref_params)
    if attn_chunk is None:
        attn_chunk = auto_attn_chunk(inputs.shape[0], max(model.cfg.n_head, ref.cfg.n_head), inputs.shape[1])
    hidden = model.hidden(inputs, attn_chunk=attn_chunk)  # (B, W, D)
    ref_hidden = ref.hidden(inputs, attn_chunk=attn_chunk)
    if logits_chunk is None:
        logits_chunk = max(1, models.loss.auto_chunk(*inputs.shape, model.cfg.vocab_size) // 2)
    nll, correct = models.loss.chunked_nll(model.head, hidden, targets, logits_chunk)
    kl, agree = models.loss.chunked_agreement(model.head, hidden, ref.head, ref_hidden, logits_chunk)
    sums = [jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(correct & mask)]
    return (*sums, jnp.sum(jnp.where(mask, kl, 0.0)), jnp.sum(agree & mask))


def evaluate(
    graphdef,
    params,
    tokens: np.ndarray,
    token_bytes: np.ndarray,
    protocol: Protocol,
    *,
    batch_size: int = 32,
    max_windows: int | None = None,
    progress: bool | None = None,
    desc: str = "eval",
    logits_chunk: int | None = None,
    attn_chunk: int | None = None,
    reference=None,
    sharding=None,
    blockwise: bool = False,
) -> dict:
    """Scores `tokens` with the model (graphdef, params) under `protocol`.

    Args:
      graphdef, params: the model, as from `models.split`.
      tokens: 1-D token ids.
      token_bytes: (vocab,) UTF-8 bytes per token id (the tokenizer's `token_bytes`).
      protocol: window and stride.
      batch_size: windows per forward pass, at most the number of windows (the last batch is padded with masked
        rows).
      max_windows: evaluate only the first this many windows.
      progress: show a progress bar (None: only on a terminal).
      desc: progress bar label.
      logits_chunk: positions whose (batch, chunk, vocab) logits are computed at once (`models.loss.chunked_nll`);
        None picks `models.loss.auto_chunk` (about 64 MiB of logits); the window (or more) is the unchunked path.
      attn_chunk: queries whose attention scores are computed at once (`transformer.chunked_causal_attention`);
        None picks `auto_attn_chunk` (ATTN_CHUNK queries when one layer's full scores would pass 64 MiB, so small
        models keep the plain attention); the window (or more) is the unchunked attention.
      reference: (graphdef, params) of a reference model (the dense one, same vocabulary): also measure how
        closely this model's next-token distributions follow it on the scored tokens, what "lossless" means for a
        model's outputs: KL(reference || model) per token (0 when the distributions are equal) and top-1
        agreement (the fraction of scored positions where both models rank the same token first).
      sharding: a batch sharding over a mesh (`parallel.sharding.batch_sharding`): each batch's windows are split
        over its devices (every process puts only its own rows, `distributed.put_rows`), the batch size is
        rounded up to a multiple of the devices they are split over, and parameters not yet on the mesh are
        replicated on it. The sums equal the one-device ones to float32 rounding. None: one device.
      blockwise: run each batch a block at a time (`eval.blockwise`): only one block's weights are converted to
        the compute dtype at once, so bf16 master weights (or host arrays) stay as they are; one device, no
        reference.

    Returns:
      {"loss" (nats/token), "perplexity", "bits_per_byte", "accuracy", "tokens", "bytes", "protocol"}, and with a
      reference also "kl" (nats per token), "kl_bits" (bits per token) and "top1_agreement".
    """
    if batch_size <= 0:
        raise errors.UserError(f"eval batch size must be positive, got {batch_size}")
    for name, value in (("logits chunk", logits_chunk), ("attention chunk", attn_chunk)):
        if value is not None and value <= 0:
            raise errors.UserError(f"eval {name} must be positive, got {value}")
    inputs, targets, mask = windows(tokens, protocol, max_windows)
    # Never more rows than windows: padding one window to a batch of 8 made a 1B model's one-window evaluation 7.8x
    # slower than transformers' (issue 33); only the last of several batches is padded.
    batch_size = max(1, min(batch_size, len(inputs)))
    put = np.asarray
    if sharding is not None:
        batch_size = -(-batch_size // sharding_lib.row_shards(sharding)) * sharding_lib.row_shards(sharding)
        params = sharding_lib.replicate(params, sharding.mesh)
        if reference is not None:
            reference = (reference[0], sharding_lib.replicate(reference[1], sharding.mesh))

        def put(a):
            return distributed.put_rows(a, sharding)

    pad = -len(inputs) % batch_size
    if pad:
        inputs, targets = (np.concatenate([a, np.zeros((pad, a.shape[1]), a.dtype)]) for a in (inputs, targets))
        mask = np.concatenate([mask, np.zeros((pad, mask.shape[1]), bool)])
    # Compiled ahead of the loop (jax caches the executable per shape, as a jitted call would), then the heap the
    # compiler freed is handed back before the first batch runs: otherwise glibc keeps it (~90 MiB for
    # SmolLM2-135M) and the evaluation's peak stacks on top of it (benchmarks/eval_memory.py).
    if blockwise:
        if reference is not None or sharding is not None:
            raise errors.UserError("blockwise evaluation runs on one device and without a reference model")
        return _blockwise(graphdef, params, inputs, targets, mask, token_bytes, protocol, batch_size, logits_chunk,
                          attn_chunk, disable=None if progress is None else not progress, desc=desc)  # fmt: skip
    first = [put(a[:batch_size]) for a in (inputs, targets, mask)]
    if reference is None:
        step = _eval_step.lower(graphdef, params, *first, logits_chunk, attn_chunk)
    else:
        ref_graphdef, ref_params = reference
        step = _agree_step.lower(graphdef, params, *first, ref_params, ref_graphdef, logits_chunk, attn_chunk)
    step = step.compile()
    hardware.release_freed_memory()
    nll, correct, kl, agree = 0.0, 0, 0.0, 0
    disable = None if progress is None else not progress
    for i in tqdm(range(0, len(inputs), batch_size), desc=desc, disable=disable, leave=False):
        batch = [put(a[i : i + batch_size]) for a in (inputs, targets, mask)]
        if reference is None:
            b_nll, b_correct = step(params, *batch)
        else:
            b_nll, b_correct, b_kl, b_agree = step(params, *batch, ref_params)
            kl += float(b_kl)
            agree += int(b_agree)
        nll += float(b_nll)
        correct += int(b_correct)
    return _result(nll, correct, kl, agree, targets, mask, token_bytes, protocol, reference)


def _blockwise(graphdef, params, inputs, targets, mask, token_bytes, protocol, batch_size, logits_chunk,
               attn_chunk, disable, desc) -> dict:  # fmt: skip
    """`evaluate` with `blockwise=True`: the same sums, a block at a time (see `eval.blockwise`)."""
    from research.eval import blockwise

    cfg = models.merge(graphdef, params).cfg
    attn_chunk = attn_chunk or auto_attn_chunk(batch_size, cfg.n_head, inputs.shape[1])
    logits_chunk = logits_chunk or models.loss.auto_chunk(batch_size, inputs.shape[1], cfg.vocab_size)
    nll, correct = 0.0, 0
    for i in tqdm(range(0, len(inputs), batch_size), desc=desc, disable=disable, leave=False):
        b_nll, b_correct = blockwise.step(
            graphdef, params, *(a[i : i + batch_size] for a in (inputs, targets, mask)), logits_chunk, attn_chunk
        )
        nll += float(b_nll)
        correct += int(b_correct)
    return _result(nll, correct, 0.0, 0, targets, mask, token_bytes, protocol, None)


def _result(nll, correct, kl, agree, targets, mask, token_bytes, protocol, reference) -> dict:
    count = int(mask.sum())
    nbytes = int(np.asarray(token_bytes)[targets[mask]].sum())
    loss = nll / count
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": nll / math.log(2) / max(nbytes, 1),
        "accuracy": correct / count,
        "tokens": count,
        "bytes": nbytes,
        "protocol": protocol.describe(),
        **(
            {"kl": kl / count, "kl_bits": kl / count / math.log(2), "top1_agreement": agree / count}
            if reference
            else {}
        ),
    }
