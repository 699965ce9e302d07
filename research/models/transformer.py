"""A decoder-only transformer in Flax NNX covering the GPT-2, Llama, OPT and GPT-NeoX families.

The module holds nothing but `nnx.Param`s, so `nnx.split(model, nnx.Param)` captures all of its state and
`research.models.split` turns that into a plain nested dict with readable paths:

    embed/embedding                      (V, D)
    pos_embed/embedding                  (T, D)       learned positions only
    layers/{i}/attn_norm/scale|bias      (D,)
    layers/{i}/attn/q|k|v|o/kernel|bias  (D, H*hd) (D, KV*hd) (D, KV*hd) (H*hd, D)
    layers/{i}/mlp_norm/scale|bias       (D,)
    layers/{i}/mlp/gate|up|down/kernel   (D, F) (D, F) (F, D)   gate only in gated (SwiGLU) MLPs
    final_norm/scale|bias                (D,)
    lm_head/kernel                       (D, V)       untied heads only

Kernels are (in, out). Dropout (on embeddings, attention probabilities and both residual branches, as in
GPT-2 / nanoGPT) is functional: it runs only when a `dropout_rng` key is passed, so the module has no random state
and training stays a pure function of (params, batch, key).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.models import act_quant
from research.models import config as model_config

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def _dropout(x, rate: float, rng):
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def rope_frequencies(cfg: model_config.ModelConfig) -> np.ndarray:
    """(rope_dim // 2,) float32 inverse frequencies of RoPE, with the config's scaling applied."""
    dim = cfg.rope_dim
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if cfg.rope_scaling == "linear":
        inv = inv / cfg.rope_factor
    elif cfg.rope_scaling == "llama3":
        wavelen = 2 * np.pi / inv
        old, lo, hi = cfg.rope_original_max_len, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        scaled = np.where(wavelen > old / lo, inv / cfg.rope_factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        ramp = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = np.where(medium, ramp, scaled)
    return inv.astype(np.float32)


def apply_rope(x, positions, theta: float, rot_dim: int, inv_freq=None):
    """Rotary position embedding in the "rotate half" layout used by Hugging Face Llama.

    Args:
      x: (B, T, N, hd) queries or keys.
      positions: (B, T) integer positions.
      theta: base frequency.
      rot_dim: number of leading dimensions of each head to rotate (even); the rest pass through.
      inv_freq: (rot_dim // 2,) inverse frequencies overriding theta's (scaled RoPE, see `rope_frequencies`).

    Returns:
      (B, T, N, hd) array of x's dtype.
    """
    half = rot_dim // 2
    if inv_freq is None:
        inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / rot_dim)  # (half,)
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # (B, T, half)
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]  # (B, T, 1, half)
    xf = x.astype(jnp.float32)
    x1, x2, rest = xf[..., :half], xf[..., half:rot_dim], xf[..., rot_dim:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return out.astype(x.dtype)


def causal_attention(q, k, v, dropout: float = 0.0, rng=None, window: int | None = None):
    """Causal softmax attention with grouped-query heads.

    Args:
      q: (B, T, H, hd) queries; k, v: (B, T, KV, hd) with H a multiple of KV (query head n reads kv head
        n // (H // KV), as in Hugging Face's repeat_kv).
      dropout: dropout rate on the attention probabilities, applied only when `rng` is given.
      rng: PRNG key enabling dropout.
      window: sliding window (each query sees at most this many keys, itself included); None sees all.

    Returns:
      (B, T, H, hd). Without dropout this is `jax.nn.dot_product_attention` with its default implementation,
      which in jax 0.10-0.11 is XLA's (the (B, H, T, T) scores materialised), not cuDNN's fused flash attention.
    """
    if rng is None or dropout == 0.0:
        local = None if window is None else (window - 1, 0)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local)
    t = q.shape[1]
    pos = jnp.arange(t)
    return _masked_attention(q, k, v, _visible(pos[None], pos, window), dropout, rng)


def chunked_causal_attention(q, k, v, chunk: int, window: int | None = None, segments: int = 2):
    """Causal attention computed `chunk` queries at a time, without dropout (evaluation).

    The query chunks are split into at most `segments` consecutive runs of at least two chunks. Each run is one
    sequential loop (`jax.lax.fori_loop`), so one chunk's scores exist at a time, (B, H, chunk, S) instead of
    (B, H, T, T), and its chunks see only the keys up to the run's last query (a static slice), so most of the
    masked upper triangle is never computed: with r runs, (r + 1) / (2r) of the full score matrix. Each chunk is
    `jax.nn.dot_product_attention` with its mask, so the result equals `causal_attention` to float rounding.

    Loops rather than a Python loop over chunks: XLA's CPU scheduler keeps the scores of independent unrolled
    chunks alive together (measured: no memory saved), but runs the loops one after another.

    Args:
      q: (B, T, H, hd) queries; k, v: (B, T, KV, hd), as in `causal_attention`.
      chunk: queries per chunk (>= 1); chunk >= T is `causal_attention` itself. T need not be a multiple.
      window: sliding window, as in `causal_attention`.
      segments: most runs. More runs skip more of the masked triangle but each is a loop of its own per layer, and
        compile time and the compiled program's memory grow with the loops: for SmolLM2-135M (30 layers, window
        2048, chunk 128) 2 runs compile in about half the time of 4 and keep ~65 MiB less, for ~8% more CPU time.

    Returns:
      (B, T, H, hd).
    """
    b, t, h, d = q.shape
    if chunk >= t:
        return causal_attention(q, k, v, window=window)
    n = -(-t // chunk)
    qs = jnp.pad(q, ((0, 0), (0, n * chunk - t), (0, 0), (0, 0))).reshape(b, n, chunk, h, d).swapaxes(0, 1)
    runs = max(1, min(segments, n // 2))  # >= 2 chunks per run: a one-step loop would be unrolled
    bounds = [round(i * n / runs) for i in range(runs + 1)]
    outs = []
    for c0, c1 in zip(bounds[:-1], bounds[1:]):
        stop = min(c1 * chunk, t)  # keys up to the run's last query
        lo = 0 if window is None else max(0, c0 * chunk - window + 1)
        ks, vs, k_pos = k[:, lo:stop], v[:, lo:stop], jnp.arange(lo, stop)

        def one(i, buf, c0=c0, ks=ks, vs=vs, k_pos=k_pos):
            # Slot i holds chunk i's queries until its output overwrites them: the loop needs no output buffer of
            # its own (a scan's zero-initialised one is loop-invariant, and XLA allocates those of every layer up
            # front).
            qc = jax.lax.dynamic_index_in_dim(buf, i, keepdims=False)  # (B, C, H, hd)
            mask = _visible(((c0 + i) * chunk + jnp.arange(chunk))[None], k_pos, window)  # (1, C, S)
            y = jax.nn.dot_product_attention(qc, ks, vs, mask=mask[:, None])
            return jax.lax.dynamic_update_index_in_dim(buf, y.astype(buf.dtype), i, 0)

        outs.append(jax.lax.fori_loop(0, c1 - c0, one, qs[c0:c1]))  # (c1 - c0, B, C, H, hd)
    return jnp.concatenate(outs).swapaxes(0, 1).reshape(b, n * chunk, h, d)[:, :t]


def cached_attention(q, k_cache, v_cache, positions, window: int | None = None):
    """Attention of new queries over a key/value cache whose slot s holds position s.

    Args:
      q: (B, T, H, hd) queries at `positions`.
      k_cache, v_cache: (B, S, KV, hd), already holding the new keys and values.
      positions: (B, T) positions of the queries; slots after a query's position are masked.
      window: sliding window, as in `causal_attention`.

    Returns:
      (B, T, H, hd).
    """
    mask = _visible(positions, jnp.arange(k_cache.shape[1]), window)  # (B, T, S)
    return jax.nn.dot_product_attention(q, k_cache, v_cache, mask=mask[:, None])


def _visible(q_pos, k_pos, window):
    """(B, T, S) bool: key at k_pos is visible from the query at q_pos."""
    ok = k_pos[None, None, :] <= q_pos[..., None]
    if window is not None:
        ok &= k_pos[None, None, :] > q_pos[..., None] - window
    return ok


def _masked_attention(q, k, v, mask, dropout, rng):
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = _dropout(jax.nn.softmax(scores, axis=-1), dropout, rng).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class KVCache(NamedTuple):
    """Keys and values of the positions seen so far; slot s of every layer holds position s.

    k, v: one (B, S, KV, hd) array per layer, S the cache capacity; length: () int32, the positions filled.
    """

    k: tuple
    v: tuple
    length: jax.Array


class Norm(nnx.Module):
    """LayerNorm (scale, optional bias) or RMSNorm (scale), computed in float32."""

    def __init__(self, dim: int, kind: str, eps: float, bias: bool):
        self.kind, self.eps = kind, eps
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32)) if (bias and kind == "layernorm") else None

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        if self.kind == "layernorm":
            xf = xf - xf.mean(-1, keepdims=True)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + self.eps) * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(x.dtype)


_TAPS: contextvars.ContextVar = contextvars.ContextVar("ziplm_linear_taps", default=None)


@contextlib.contextmanager
def tap_inputs():
    """Records the input of every block linear layer called inside the context.

    Yields a dict that fills with {tap name: input array}, names relative to the block ("attn/q", "attn/o",
    "mlp/up", "mlp/down", ...), as calibration-based compression (Wanda, SparseGPT, GPTQ) needs. Works under
    tracing: read the dict inside the traced function and return what you need.

    Why a context variable and not `nnx.Module.sow(nnx.Intermediate, ...)`: every forward pass here is the pure
    function `models.merge(graphdef, params)(x)` under `jax.jit`; sown values would live in the module's state,
    so the functional call would have to split them back out (and every non-calibration caller would carry the
    collection), while the context variable is read only inside a trace that set it and costs nothing otherwise.
    """
    taps: dict = {}
    token = _TAPS.set(taps)
    try:
        yield taps
    finally:
        _TAPS.reset(token)


class Linear(nnx.Linear):
    """`nnx.Linear` whose input can be recorded with `tap_inputs` under the name `tap`, and fake-quantized per
    token to `act_bits` bits (`models.act_quant`; None: left alone). The recorded input is the one before
    activation quantization."""

    def __init__(self, *args, tap: str, act_bits: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.tap, self.act_bits = tap, act_bits

    def __call__(self, x):
        taps = _TAPS.get()
        if taps is not None:
            taps[self.tap] = x
        if self.act_bits is not None:
            x = act_quant.quantize_per_token(x, self.act_bits)
        return super().__call__(x)


def _linear(din, dout, cfg, rngs, std, bias, tap):
    return Linear(
        din,
        dout,
        use_bias=bias,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.float32,
        kernel_init=nnx.initializers.normal(std),
        bias_init=nnx.initializers.zeros,
        rngs=rngs,
        tap=tap,
        act_bits=cfg.act_bits,
    )


class Attention(nnx.Module):
    """Causal multi-head attention with grouped-query heads and optional RoPE."""

    def __init__(self, cfg: model_config.ModelConfig, rngs: nnx.Rngs, out_std: float):
        self.cfg = cfg
        hd = cfg.dim_head
        qkv_bias = cfg.has_bias("qkv")
        self.q = _linear(cfg.d_model, cfg.n_head * hd, cfg, rngs, 0.02, qkv_bias, "attn/q")
        self.k = _linear(cfg.d_model, cfg.kv_heads * hd, cfg, rngs, 0.02, qkv_bias, "attn/k")
        self.v = _linear(cfg.d_model, cfg.kv_heads * hd, cfg, rngs, 0.02, qkv_bias, "attn/v")
        self.o = _linear(cfg.n_head * hd, cfg.d_model, cfg, rngs, out_std, cfg.has_bias("o"), "attn/o")

    def __call__(self, x, positions, rng=None, kv=None, length=None, attn_chunk=None):
        """Attention output, plus the updated (k_cache, v_cache) when `kv` is given (else None).

        With a cache, the new keys and values are written at slots length .. length + T - 1, which must equal
        `positions`. Without a cache and without dropout, `attn_chunk` computes the attention that many queries at
        a time (`chunked_causal_attention`).
        """
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q(x).reshape(b, t, cfg.n_head, cfg.dim_head)  # (B, T, H, hd)
        k = self.k(x).reshape(b, t, cfg.kv_heads, cfg.dim_head)  # (B, T, KV, hd)
        v = self.v(x).reshape(b, t, cfg.kv_heads, cfg.dim_head)
        if cfg.position == "rope":
            inv_freq = rope_frequencies(cfg) if cfg.rope_scaling else None
            q = apply_rope(q, positions, cfg.rope_theta, cfg.rope_dim, inv_freq)
            k = apply_rope(k, positions, cfg.rope_theta, cfg.rope_dim, inv_freq)
        if kv is None and attn_chunk is not None and (rng is None or cfg.dropout == 0.0):
            y = chunked_causal_attention(q, k, v, attn_chunk, cfg.sliding_window)  # (B, T, H, hd)
        elif kv is None:
            y = causal_attention(q, k, v, cfg.dropout, rng, cfg.sliding_window)  # (B, T, H, hd)
        else:
            k_cache = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, length, 0, 0))  # (B, S, KV, hd)
            v_cache = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, length, 0, 0))
            y = cached_attention(q, k_cache, v_cache, positions, cfg.sliding_window)
            kv = (k_cache, v_cache)
        return self.o(y.reshape(b, t, cfg.n_head * cfg.dim_head)), kv


class MLP(nnx.Module):
    """Position-wise MLP: down(act(up(x))), or down(act(gate(x)) * up(x)) when gated."""

    def __init__(self, cfg: model_config.ModelConfig, rngs: nnx.Rngs, out_std: float):
        self.act = _ACTIVATIONS[cfg.activation]
        bias = cfg.has_bias("mlp")
        self.gate = _linear(cfg.d_model, cfg.ff_dim, cfg, rngs, 0.02, bias, "mlp/gate") if cfg.gated_mlp else None
        self.up = _linear(cfg.d_model, cfg.ff_dim, cfg, rngs, 0.02, bias, "mlp/up")
        self.down = _linear(cfg.ff_dim, cfg.d_model, cfg, rngs, out_std, bias, "mlp/down")

    def __call__(self, x):
        h = self.up(x)  # (B, T, F)
        h = self.act(self.gate(x)) * h if self.gate is not None else self.act(h)
        return self.down(h)


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)); or, with a parallel residual,
    x + attn(norm1(x)) + mlp(norm2(x))."""

    def __init__(self, cfg: model_config.ModelConfig, rngs: nnx.Rngs):
        out_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        self.dropout, self.parallel = cfg.dropout, cfg.parallel_residual
        self.attn_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.has_bias("norm"))
        self.attn = Attention(cfg, rngs, out_std)
        self.mlp_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.has_bias("norm"))
        self.mlp = MLP(cfg, rngs, out_std)

    def __call__(self, x, positions, rng=None, kv=None, length=None, attn_chunk=None):
        r_attn, r1, r2 = (None, None, None) if rng is None else jax.random.split(rng, 3)
        a, kv = self.attn(self.attn_norm(x), positions, r_attn, kv, length, attn_chunk)
        a = _dropout(a, self.dropout, r1)
        h = x if self.parallel else x + a
        m = _dropout(self.mlp(self.mlp_norm(h)), self.dropout, r2)
        return (x + a + m if self.parallel else h + m), kv


class Transformer(nnx.Module):
    """Decoder-only language model; `model(tokens)` returns next-token logits, `model.hidden(tokens)` the final
    hidden states and `model.head(h)` their logits."""

    def __init__(self, cfg: model_config.ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = jnp.dtype(cfg.dtype)
        emb_init = nnx.initializers.normal(0.02)
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, embedding_init=emb_init, rngs=rngs)
        if cfg.position == "learned":
            self.pos_embed = nnx.Embed(cfg.max_seq_len, cfg.d_model, dtype=dtype, embedding_init=emb_init, rngs=rngs)
        self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layer)])
        self.final_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.has_bias("norm"))
        if not cfg.tie_embeddings:
            self.lm_head = nnx.Linear(
                cfg.d_model, cfg.vocab_size, use_bias=False, dtype=dtype, kernel_init=emb_init, rngs=rngs
            )

    def embed_tokens(self, tokens, positions):
        """The first block's input: token (plus learned position) embeddings, (B, T) -> (B, T, D)."""
        x = self.embed(tokens)
        if self.cfg.position == "learned":
            x = x + self.pos_embed(positions)
        return x

    def head(self, x):
        """Next-token logits of final hidden states: (..., D) -> (..., V) float32 (tied or untied head)."""
        logits = self.embed.attend(x) if self.cfg.tie_embeddings else self.lm_head(x)
        return logits.astype(jnp.float32)

    def hidden(self, tokens, positions=None, *, dropout_rng=None, attn_chunk: int | None = None):
        """Final hidden states (after the final norm), without the output head.

        `model.head(model.hidden(tokens))` equals `model(tokens)`; `research.models.loss.chunked_nll` scores the
        hidden states without materialising all (B, T, V) logits at once.

        Args:
          tokens: (B, T) int token ids.
          positions: (B, T) int positions; defaults to 0..T-1 for every row.
          dropout_rng: a PRNG key to enable dropout (training); None runs deterministically.
          attn_chunk: compute the attention this many queries at a time (`chunked_causal_attention`; at most
            (B, H, attn_chunk, T) scores per layer instead of (B, H, T, T)); None: all at once. Ignored under
            dropout.

        Returns:
          (B, T, D) hidden states in the compute dtype.
        """
        x, _ = self._trunk(tokens, positions, dropout_rng, None, attn_chunk)
        return x

    def __call__(
        self, tokens, positions=None, *, dropout_rng=None, cache: KVCache | None = None, attn_chunk: int | None = None
    ):
        """Next-token logits.

        Args:
          tokens: (B, T) int token ids.
          positions: (B, T) int positions; defaults to 0..T-1 for every row (cache.length + 0..T-1 with a cache;
            positions cannot be given together with a cache).
          dropout_rng: a PRNG key to enable dropout (training); None runs deterministically.
          cache: a `KVCache` (see `research.models.decode`): the tokens continue the cached sequence, and the
            call returns (logits, updated cache).
          attn_chunk: see `hidden` (no effect with a cache).

        Returns:
          (B, T, V) float32 logits, or (logits, cache) when a cache is given.
        """
        x, cache = self._trunk(tokens, positions, dropout_rng, cache, attn_chunk)
        logits = self.head(x)
        return logits if cache is None else (logits, cache)

    def _trunk(self, tokens, positions, dropout_rng, cache, attn_chunk):
        """(final-normed hidden states (B, T, D), updated cache or None)."""
        cfg = self.cfg
        b, t = tokens.shape
        if cache is not None:
            if positions is not None:
                raise ValueError("positions cannot be given with a cache: they follow from cache.length")
            positions = jnp.broadcast_to(cache.length + jnp.arange(t, dtype=jnp.int32), (b, t))
        elif positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = self.embed_tokens(tokens, positions)  # (B, T, D)
        n = cfg.n_layer + 1
        rngs = [None] * n if dropout_rng is None else list(jax.random.split(dropout_rng, n))
        x = _dropout(x, cfg.dropout, rngs[0])
        new_k, new_v = [], []
        for i, (layer, rng) in enumerate(zip(self.layers, rngs[1:])):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            x, kv = layer(x, positions, rng, kv, None if cache is None else cache.length, attn_chunk)
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        x = self.final_norm(x)
        if cache is None:
            return x, None
        return x, KVCache(tuple(new_k), tuple(new_v), cache.length + t)
