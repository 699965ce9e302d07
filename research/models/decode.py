"""Incremental decoding with a key/value cache, and sampling.

`step` feeds a block of tokens (one or many) that continues the cached sequence and returns their logits and the
updated cache; it is one jitted function, so the same shapes and inputs give bit-identical outputs on one machine
(the arithmetic coder relies on this). `prefill` feeds a block without computing its logits (the output head is
never run: a long prompt costs no (B, T, V) array). Both donate the cache, so its buffers are updated in place,
never copied; `reset` empties a cache for reuse without a new allocation. `generate` prefills the prompt with one
`step`, then samples one token at a time inside a `lax.fori_loop`: greedy (temperature 0), temperature, and top-k.

    cache = decode.init_cache(cfg, batch=1, capacity=256)
    logits, cache = decode.step(graphdef, params, cache, prompt)       # (1, P, V)
    cache = decode.prefill(graphdef, params, decode.reset(cache), prompt[:, :-1])
    out = decode.generate(graphdef, params, prompt, 50, temperature=0.8, top_k=40, seed=0)

Size the cache to what will be decoded (`capacity`): every step attends over all of its slots, so its cost and
memory grow with the capacity, not with the positions filled.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from research import errors, models
from research.models import config as model_config
from research.models.transformer import KVCache


def init_cache(cfg: model_config.ModelConfig, batch: int, capacity: int | None = None, dtype=None) -> KVCache:
    """An empty cache for `batch` sequences of up to `capacity` positions (default: the model's context).

    Args:
      cfg: the model configuration.
      batch: number of sequences decoded together.
      capacity: cache slots per sequence; positions past it cannot be decoded.
      dtype: cache dtype; defaults to the model's compute dtype.
    """
    capacity = capacity or cfg.max_seq_len
    if cfg.position == "learned" and capacity > cfg.max_seq_len:
        raise errors.UserError(f"cache capacity {capacity} exceeds the model's {cfg.max_seq_len} learned positions")
    shape = (batch, capacity, cfg.kv_heads, cfg.dim_head)
    dtype = jnp.dtype(dtype or cfg.dtype)
    k, v = (tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layer)) for _ in range(2))
    return KVCache(k, v, jnp.zeros((), jnp.int32))


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _step(graphdef, params, cache, tokens):
    return models.merge(graphdef, params)(tokens, cache=cache)


def reset(cache: KVCache) -> KVCache:
    """The same buffers as an empty cache (length 0); the stale slots are masked until they are overwritten."""
    return KVCache(cache.k, cache.v, jnp.zeros((), jnp.int32))


def _check_room(cache: KVCache, tokens) -> None:
    capacity = cache.k[0].shape[1]
    if int(cache.length) + tokens.shape[1] > capacity:
        raise errors.UserError(
            f"decoding {tokens.shape[1]} token(s) after {int(cache.length)} would pass the cache capacity {capacity}"
        )


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _prefill(graphdef, params, cache, tokens):
    _, cache = models.merge(graphdef, params)(tokens, cache=cache)
    return cache  # the logits are unused, so XLA drops the output head


def prefill(graphdef, params, cache: KVCache, tokens) -> KVCache:
    """The cache with `tokens` appended, as `step` leaves it, without computing their logits.

    Args:
      graphdef, params: the model.
      cache: from `init_cache`, `reset` or an earlier call; it is consumed (its buffers are donated).
      tokens: (B, T) int token ids at positions cache.length .. cache.length + T - 1.

    Returns:
      The new cache.
    """
    _check_room(cache, tokens)
    return _prefill(graphdef, params, cache, jnp.asarray(tokens, jnp.int32))


def step(graphdef, params, cache: KVCache, tokens) -> tuple[jax.Array, KVCache]:
    """Logits of `tokens` continuing the cached sequences, and the cache with them appended.

    Args:
      graphdef, params: the model.
      cache: from `init_cache` or an earlier `step`; it is consumed (its buffers are donated).
      tokens: (B, T) int token ids at positions cache.length .. cache.length + T - 1.

    Returns:
      (B, T, V) float32 logits and the new cache.
    """
    _check_room(cache, tokens)
    return _step(graphdef, params, cache, jnp.asarray(tokens, jnp.int32))


def _pick(logits, key, temperature, top_k):
    """Next token ids (B,) from (B, V) logits: argmax at temperature 0, else a sample among the top k."""
    if temperature == 0.0:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # (B, 1)
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5, 6))
def _generate_cached(graphdef, params, prompt, new, temperature, top_k, capacity, key):
    model = models.merge(graphdef, params)
    b, p = prompt.shape
    logits, cache = model(prompt, cache=init_cache(model.cfg, b, capacity))
    out = jnp.zeros((b, p + new), jnp.int32).at[:, :p].set(prompt)
    tok = _pick(logits[:, -1], jax.random.fold_in(key, 0), temperature, top_k)

    def body(i, carry):
        out, cache, tok = carry
        out = out.at[:, p + i].set(tok)
        logits, cache = model(tok[:, None], cache=cache)
        return out, cache, _pick(logits[:, -1], jax.random.fold_in(key, i + 1), temperature, top_k)

    out, _, tok = jax.lax.fori_loop(0, new - 1, body, (out, cache, tok))
    return out.at[:, p + new - 1].set(tok)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _generate_uncached(graphdef, params, prompt, new, temperature, top_k, key):
    model = models.merge(graphdef, params)
    b, p = prompt.shape
    out = jnp.zeros((b, p + new), jnp.int32).at[:, :p].set(prompt)

    def body(i, out):
        logits = model(out)  # (B, P+N, V): the whole buffer again; only position p+i-1 is used
        tok = _pick(logits[:, p + i - 1], jax.random.fold_in(key, i), temperature, top_k)
        return out.at[:, p + i].set(tok)

    return jax.lax.fori_loop(0, new, body, out)


def generate(
    graphdef,
    params,
    prompt,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    use_cache: bool = True,
) -> np.ndarray:
    """Continues `prompt` by `max_new_tokens` tokens.

    Args:
      graphdef, params: the model.
      prompt: (B, P) int token ids, P >= 1 (rows of equal length).
      max_new_tokens: tokens to add.
      temperature: 0 picks the most likely token (greedy); > 0 samples from softmax(logits / temperature).
      top_k: sample only among the k most likely tokens (None or 0: all).
      seed: sampling seed; the same seed, prompt and settings give the same output.
      use_cache: decode with the KV cache (False recomputes the whole sequence for every token: a baseline).

    Returns:
      (B, P + max_new_tokens) int32 array: the prompt followed by the new tokens.
    """
    prompt = np.asarray(prompt, np.int32)
    cfg = models.merge(graphdef, params).cfg
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise errors.UserError(f"prompt must be a (batch, length >= 1) array of token ids, got shape {prompt.shape}")
    if temperature < 0:
        raise errors.UserError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and not 0 <= top_k <= cfg.vocab_size:
        raise errors.UserError(f"top_k must be in [0, {cfg.vocab_size}], got {top_k}")
    if max_new_tokens < 1:
        return prompt
    total = prompt.shape[1] + max_new_tokens
    if total > cfg.max_seq_len:
        raise errors.UserError(
            f"prompt ({prompt.shape[1]}) + new tokens ({max_new_tokens}) = {total} exceeds the model's context "
            f"({cfg.max_seq_len}); ask for fewer tokens"
        )
    key = jax.random.key(seed)
    args = (graphdef, params, jnp.asarray(prompt), max_new_tokens, float(temperature), top_k or None)
    out = _generate_cached(*args, total, key) if use_cache else _generate_uncached(*args, key)
    return np.asarray(out)
