"""Language modeling is compression: range coding of any bytes with a model's next-token probabilities.

    blob, rep = lm.encode(data, m)          # m: a `sources.Model` (run, compressed directory, packed file, HF, GGUF)
    data2, _ = lm.decode(blob, m)           # == data, or a CorruptData / UserError

Tokens. A byte-level model codes the bytes themselves. A tokenizer model codes token ids: the input is cut into
runs of valid UTF-8 and invalid bytes; each text run is tokenized and kept only if decoding its tokens gives back
its exact bytes, and every other byte is an escape byte, stored raw (8 bits) in its own section. So any input
round-trips, whatever the tokenizer does with it.

Streams and windows. The token stream is cut into `batch_size` contiguous segments, coded as parallel streams
through the KV cache. The coder uses `context` positions of the model (default: the model's context, capped at
`DEFAULT_CONTEXT`); each stream advances window by window: a window codes the next `chunk_len` tokens (default:
half the context) one position per step, after a prefill of the `context - chunk_len + 1` tokens before them (the
first window starts from a fixed start token: the tokenizer's BOS, else its EOS, else byte 10, "\n"), so every
token after the first window sees at least that much context. One cache serves every window, sized to the most
positions a window fills (at most `context`; less for short inputs), reset between windows and donated through
every step, so its buffers are updated in place. All streams take the same steps on the same shapes in the encoder
and the decoder (a stream that has run out is masked, not shortened).

Coding. One jitted function (`_coded_step`) runs the model one position and quantizes its next-token
distribution on the device: softmax in float32, then integer frequencies f = floor(p * 2**30) + 1 (every token
keeps a non-zero frequency; totals stay below 2**31). Encoder and decoder call it on the same shapes, so they get
bit-identical tables; the float probabilities never leave the device. For the encoder it also returns the coded
token's (cumulative low, frequency, total) and log-probability; the decoder reads the (B, V) integer table and
searches it. A 64-bit range coder (`coding.rangecoder`) codes the symbols of all streams, position by position, in
one byte stream. The coded size is the model's log-loss on the data, -sum log2 p(x_t), plus the quantization loss
(the 2**-30 floor and float32 rounding: about V * 2**-30 of the mass), a few bytes of range-coder flush and the
header; the report gives the ideal bits and the overhead. A token the model gives less than ~2**-30 costs at most
~30 bits, fewer than its -log2 p, so the overhead can be negative on out-of-domain data.

Stored fallback. When the coded file would not be smaller than the input plus 10 bytes, the file stores the input
raw instead (10 bytes of framing), so incompressible input grows by 10 bytes at most; a stored file needs no model.
The encoder gives up as soon as the header, the escape bytes and the range coder's output so far reach that size
(before running the model at all when the header and escapes do: random bytes through a tokenizer), so
incompressible input costs a fraction of a full coding pass; the report's ideal bits are then None.

File layout (little-endian, version 2). Coded, a 40-60 byte header and the payload:

    4 bytes magic b"ZLMT", u8 version, u8 flags (0)
    8 bytes the model's fingerprint (the first 8 bytes of `fingerprint`), 4 bytes the tokenizer's
    8 bytes the first 8 bytes of the input's SHA-256, u32 CRC-32 of the payload
    LEB128 varints: input length, tokens, context, chunk length, batch size, start token, range-coder bytes,
            escape bytes, number of runs, then per run (bytes << 1 | is_escape) and, for text runs, its tokens
    u32 CRC-32 of everything above
    payload: the range coder's bytes, then the escape bytes

Stored: 4 bytes magic, u8 version, u8 flags (1), the input, u32 CRC-32 of everything before it.

Decoding checks the magic, version, header CRC, payload CRC and model fingerprint before it decodes, and the
input's hash after: a different model or a damaged file is an error, never wrong output. The tables come from
float arithmetic, so decode on the same kind of machine, backend and thread count as the encoder (XLA's matmuls may
sum in another order elsewhere; the hash catches a mismatch), and with the streams split the same way.

Version 1 files (the float64 host tables of earlier ziplm) are refused with the version named.

Devices and processes. With `sharding` (`ziplm encode / decode --devices N`, and every device of a multi-process
run) the streams are split over the devices: each process puts only its own streams' rows, the cache is sharded
by stream, and the step's outputs are gathered on every process (`distributed.to_host`: (B, 3) for the encoder,
the (B, V) tables for the decoder), where one range coder codes them in the same order; process 0 writes the file.
The file does not record the layout: decode with the device count the encoder used (another count may give other
float roundings, which the hash refuses).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import struct
import time
import typing
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from research import errors, models, tree
from research.coding import entropy, rangecoder
from research.parallel import distributed
from research.parallel import sharding as sharding_lib

MAGIC = b"ZLMT"
VERSION = 2
STORED = 1  # the flags bit of a stored file
STORED_OVERHEAD = 10  # magic, version, flags, CRC
DEFAULT_CONTEXT = 1024  # the context used by default, for models whose context is longer
PRECISION = 30  # frequencies are floor(p * 2**PRECISION) + 1
_FIXED = struct.Struct("<4sBB8s4s8sI")  # magic, version, flags, model, tokenizer, input hash, payload CRC
_FIELDS = ("length", "tokens", "context", "chunk_len", "batch_size", "start_token", "coder_bytes", "escapes")


def fingerprint(cfg, params) -> str:
    """SHA-256 of the model config and every parameter's path, dtype, shape and bytes: the same for a model and
    its packed or unpacked copies, different for any other weights."""
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    for path, x in tree.flatten(params).items():
        a = np.ascontiguousarray(np.asarray(x))
        h.update(f"{path}:{a.dtype.name}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _tokenizer_id(tok) -> bytes:
    """4 bytes naming the tokenizer in the header (b"byte", or the start of its vocabulary fingerprint)."""
    return b"byte" if tok.spec == "byte" else bytes.fromhex(tok.fingerprint.removeprefix("hf-")[:8])


_ESCAPED = re.compile("([\udc80-\udcff]+)")  # the bytes `surrogateescape` could not decode as UTF-8
RUN_CHARS = 2**20  # a text run holds at most this many characters, so decoding holds one run's text at a time


def _pieces(text: str):
    """`text` cut into runs of at most RUN_CHARS characters, each cut after a newline where there is one."""
    while len(text) > RUN_CHARS:
        cut = text.rfind("\n", 0, RUN_CHARS) + 1 or RUN_CHARS
        yield text[:cut]
        text = text[cut:]
    yield text


def _runs(data: bytes, tok) -> tuple[list, np.ndarray, bytes]:
    """(runs [[kind, n_bytes, n_tokens]], token ids, escape bytes) of the input (see the module docstring)."""
    if tok.spec == "byte":
        return [["t", len(data), len(data)]], np.frombuffer(data, np.uint8).astype(np.int32), b""
    runs, ids, escapes = [], [], bytearray()
    parts = _ESCAPED.split(data.decode("utf-8", "surrogateescape"))
    cut = [(piece, i % 2 == 0) for i, part in enumerate(parts) for piece in (_pieces(part) if i % 2 == 0 else [part])]
    for part, is_text in cut:
        if not part:
            continue
        raw = part.encode("utf-8", "surrogateescape")
        t = tok.encode(part) if is_text else None  # the other parts are the undecodable bytes
        if t is not None and tok.decode(t).encode("utf-8") == raw:
            runs.append(["t", len(raw), len(t)])
            ids.append(t)
        else:
            runs.append(["b", len(raw), 0])
            escapes += raw
    tokens = np.concatenate(ids).astype(np.int32) if ids else np.zeros(0, np.int32)
    return runs, tokens, bytes(escapes)


def _join(runs, tokens: np.ndarray, escapes: bytes, tok):
    """Yields the input's bytes run by run (a byte-level model's long run in pieces of RUN_CHARS bytes)."""
    ti, ei = 0, 0
    for kind, n_bytes, n_tokens in runs:
        if kind == "b":
            yield escapes[ei : ei + n_bytes]
            ei += n_bytes
            continue
        if tok.spec == "byte":
            for lo in range(ti, ti + n_tokens, RUN_CHARS):
                yield np.asarray(tokens[lo : min(lo + RUN_CHARS, ti + n_tokens)]).astype(np.uint8).tobytes()
        else:
            yield tok.decode(np.asarray(tokens[ti : ti + n_tokens])).encode("utf-8")
        ti += n_tokens


def quantize(logits: jax.Array) -> jax.Array:
    """(B, V) int32 frequencies of (B, V) float logits: floor(softmax * 2**PRECISION) + 1, computed in float32.

    Every entry is >= 1 and each row sums to less than 2**31 (the float32 softmax sums to 1 within ~V * 2**-24).
    A non-finite probability (NaN or infinite logits) counts as 0, so any logits give a valid table.
    """
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    p = jnp.clip(jnp.where(jnp.isfinite(p), p, 0.0), 0.0, 1.0)
    return jnp.floor(p * jnp.float32(2**PRECISION)).astype(jnp.int32) + 1


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _coded_step(graphdef, params, cache, x, sym):
    """One position of every stream: the model's step on x (B, 1), its quantized next-token table (B, V) int32,
    the table's (low, frequency, total) of `sym` (B, 3) int32 and log p(sym) (B,) float32, and the new cache."""
    logits, cache = models.merge(graphdef, params)(x, cache=cache)
    logits = logits[:, -1].astype(jnp.float32)  # (B, V)
    freqs = quantize(logits)
    below = jnp.arange(freqs.shape[-1])[None, :] < sym[:, None]
    lo = jnp.sum(jnp.where(below, freqs, 0), axis=-1)
    mine = jnp.take_along_axis(freqs, sym[:, None], axis=-1)[:, 0]
    sel = jnp.stack([lo, mine, jnp.sum(freqs, axis=-1)], axis=-1)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), sym[:, None], axis=-1)[:, 0]
    return freqs, sel, logp, cache


class Plan(typing.NamedTuple):
    """How `n` tokens are cut into streams and windows (see the module docstring).

    span: tokens per stream (the last streams may hold fewer: `lengths`, (B,)); windows: (lo, hi, ctx_lo) per
    window, coding stream positions lo .. hi - 1 after a prefill of positions ctx_lo .. lo - 1 (the start token
    when lo == 0); capacity: the cache slots the largest window fills.
    """

    span: int
    lengths: np.ndarray
    windows: list
    capacity: int


def plan(n: int, batch_size: int, context: int, chunk_len: int) -> Plan:
    """The streams and windows of `n` tokens (see `Plan`); the encoder and decoder derive the same one."""
    span = -(-n // batch_size) if n else 0
    lengths = np.clip(n - span * np.arange(batch_size), 0, span)
    keep = context - chunk_len + 1  # context carried into every window after the first
    windows, capacity = [], 0
    for lo in range(0, span, chunk_len):
        hi, ctx_lo = min(lo + chunk_len, span), max(0, lo - keep)
        windows.append((lo, hi, ctx_lo))
        capacity = max(capacity, (lo - ctx_lo if lo else 1) + hi - lo - 1)
    return Plan(span, lengths, windows, capacity)


def cache_bytes(cfg, batch_size: int, capacity: int) -> int:
    """Bytes of a KV cache of `capacity` slots for `batch_size` streams (keys and values of every layer)."""
    return 2 * cfg.n_layer * batch_size * capacity * cfg.kv_heads * cfg.dim_head * jnp.dtype(cfg.dtype).itemsize


IN_MEMORY_TOKENS = 2**26  # past this many stream slots (256 MiB of int32), decoded tokens go to a temporary file


def _token_array(batch_size: int, span: int) -> np.ndarray:
    """A zeroed (B, span) int32 array: in memory, or memory-mapped onto an unnamed temporary file when large, so
    a decode's memory stays bounded whatever length its file claims."""
    if batch_size * span <= IN_MEMORY_TOKENS:
        return np.zeros((batch_size, span), np.int32)
    import tempfile

    return np.memmap(tempfile.TemporaryFile(prefix="ziplm-tokens-"), np.int32, "w+", shape=(batch_size, span))


def _run(
    m, p: Plan, batch_size: int, start: int, code, known=None, sharding=None, progress: bool | None = False
) -> tuple[np.ndarray, float]:
    """Drives the model over the streams, window by window.

    `code(freqs, sel, logp, live, pos)` gets the step's outputs (see `_coded_step`; `distributed.to_host`
    brings them to the host) and returns the (B,) tokens at stream position `pos` (the encoder knows them; the
    decoder decodes them), or None to stop; entries where `live` is False are ignored. `known` (B, span) are the
    encoder's tokens, passed to the step as `sym`. With `sharding` (a batch sharding) the streams, their cache and
    the step's outputs are split over its devices, each process putting only its own streams' rows. `progress`:
    a bar of stream positions on stderr (None: when it is a terminal). Returns the (B, span) tokens and the
    seconds spent in the model.
    """
    from tqdm import tqdm

    from research.models import decode

    tokens = _token_array(batch_size, p.span) if known is None else np.zeros((batch_size, p.span), np.int32)
    if not p.windows:
        return tokens, 0.0
    zeros = np.zeros(batch_size, np.int32)
    params, put = m.params, jnp.asarray
    if sharding is None:
        cache = decode.init_cache(m.cfg, batch_size, p.capacity)
    else:
        params = sharding_lib.replicate(m.params, sharding.mesh)

        def put(a):
            return distributed.put_rows(np.asarray(a), sharding)

        rows = NamedSharding(sharding.mesh, P(*sharding.spec[:1]))  # the cache's streams like the batch's rows
        layout = decode.KVCache(*(((rows,) * m.cfg.n_layer,) * 2), NamedSharding(sharding.mesh, P()))
        cache = jax.jit(lambda: decode.init_cache(m.cfg, batch_size, p.capacity), out_shardings=layout)()
    seconds = 0.0
    show = _stderr_is_terminal() if progress is None else bool(progress)
    bar = tqdm(total=p.span, unit="pos", desc="coding", disable=not show, leave=False)
    for lo, hi, ctx_lo in p.windows:
        bar.update(lo - bar.n)
        prefix = np.full((batch_size, 1), start, np.int32) if lo == 0 else tokens[:, ctx_lo:lo]
        t0 = time.perf_counter()
        cache = decode.reset(cache)
        if prefix.shape[1] > 1:
            cache = decode.prefill(m.graphdef, params, cache, put(prefix[:, :-1]))
        seconds += time.perf_counter() - t0
        x = prefix[:, -1:]
        for pos in range(lo, hi):
            t0 = time.perf_counter()
            sym = zeros if known is None else known[:, pos]
            freqs, sel, logp, cache = _coded_step(m.graphdef, params, cache, put(x), put(sym))
            sel.block_until_ready()
            seconds += time.perf_counter() - t0
            live = p.lengths > pos
            out = code(freqs, sel, logp, live, pos)
            if out is None:
                bar.close()
                return tokens, seconds
            tokens[:, pos] = np.where(live, out, 0)
            x = np.array(tokens[:, pos : pos + 1])
    bar.close()
    return tokens, seconds


def _stderr_is_terminal() -> bool:
    import sys

    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def _positive(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise errors.UserError(f"{name} must be a positive integer, got {v!r}")


def _settings(m, context, chunk_len, batch_size, sharding=None) -> tuple[int, int]:
    """(context, chunk_len) after defaults and checks (UserError on a bad value)."""
    if m.tokenizer is None:
        raise errors.UserError(f"{m.source} names no tokenizer: the coder needs one (byte or hf:DIR)")
    limit = m.cfg.max_seq_len
    if context is None:
        context = min(limit, DEFAULT_CONTEXT)
    _positive("context", context)
    if context > limit:
        raise errors.UserError(
            f"context {context} exceeds the model's context ({limit}); use --context {limit} or less"
        )
    if chunk_len is None:
        chunk_len = max(1, context // 2)
    _positive("chunk_len", chunk_len)
    _positive("batch_size", batch_size)
    if sharding is not None and batch_size % sharding_lib.row_shards(sharding):
        raise errors.UserError(
            f"{batch_size} streams do not split evenly over {sharding_lib.row_shards(sharding)} devices; use a "
            "batch size that is a multiple of the device count"
        )
    if chunk_len > context:
        what = "the model's context" if context == limit else "the context"
        raise errors.UserError(f"chunk_len {chunk_len} exceeds {what} ({context}); use --chunk-len {context} or less")
    return context, chunk_len


def _stored(data: bytes) -> bytes:
    head = MAGIC + bytes([VERSION, STORED]) + data
    return head + struct.pack("<I", zlib.crc32(head) & 0xFFFFFFFF)


def encode(
    data: bytes,
    m,
    *,
    context: int | None = None,
    chunk_len: int | None = None,
    batch_size: int = 16,
    fallback: bool = True,
    sharding=None,
) -> tuple[bytes, dict]:
    """The coded file of `data` under the model `m`, and the report (sizes, ideal bits, overhead, timings).

    Args:
      data: any bytes.
      m: a `sources.Model` with a tokenizer.
      context: model positions the coder uses (default: the model's context, at most `DEFAULT_CONTEXT`).
      chunk_len: new tokens per window (default: half the context).
      batch_size: streams coded in parallel.
      fallback: store the input raw when coding would not make it smaller (False: always code; for tests).
      sharding: a batch sharding (`parallel.sharding.batch_sharding`) splitting the streams over its devices
        (`batch_size` must divide evenly); decode with the same layout (see the module docstring).
    """
    from research.data import tokenizers

    data = bytes(data)
    context, chunk_len = _settings(m, context, chunk_len, batch_size, sharding)
    t_start = time.perf_counter()
    tok = tokenizers.load(m.tokenizer)
    runs, tokens, escapes = _runs(data, tok)
    start = tok.start_token
    n = len(tokens)
    p = plan(n, batch_size, context, chunk_len)
    streams = np.zeros((batch_size, p.span), np.int32)
    for i in range(batch_size):
        streams[i, : p.lengths[i]] = tokens[i * p.span : i * p.span + p.lengths[i]]
    fields = [len(data), n, context, chunk_len, batch_size, start, 0, len(escapes), len(runs)]
    for kind, n_bytes, n_tokens in runs:
        fields += [n_bytes << 1 | (kind == "b")] + ([n_tokens] if kind == "t" else [])
    floor = _FIXED.size + len(entropy.varints(fields)) + 4 + len(escapes)  # the coded file but the coder's bytes
    limit = len(data) + STORED_OVERHEAD  # the stored file
    coder = rangecoder.Encoder()
    ideal, coder_seconds, coded_tokens = 0.0, 0.0, 0

    def code(freqs, sel, logp, live, pos):
        nonlocal ideal, coder_seconds, coded_tokens, gave_up
        t0 = time.perf_counter()
        sel, logp = distributed.to_host((sel, logp))
        for i in np.flatnonzero(live):
            coder.encode(int(sel[i, 0]), int(sel[i, 1]), int(sel[i, 2]))
        ideal -= float(np.sum(logp[live], dtype=np.float64)) / math.log(2)
        coded_tokens += int(live.sum())
        coder_seconds += time.perf_counter() - t0
        # Coding cannot beat storing any more (8: a margin for the trailing zeros `finish` may drop).
        gave_up = fallback and floor + len(coder) - 8 >= limit
        return None if gave_up else streams[:, pos]

    gave_up, model_seconds = fallback and floor >= limit, 0.0
    if not gave_up:
        _, model_seconds = _run(m, p, batch_size, start, code, known=streams, sharding=sharding)
    if gave_up:
        blob, payload, stored = _stored(data), data, True
    else:
        coded = coder.finish()
        payload = coded + escapes
        fields[6] = len(coded)
        head = _FIXED.pack(
            MAGIC,
            VERSION,
            0,
            bytes.fromhex(fingerprint(m.cfg, m.params))[:8],
            _tokenizer_id(tok),
            hashlib.sha256(data).digest()[:8],
            zlib.crc32(payload) & 0xFFFFFFFF,
        ) + entropy.varints(fields)
        blob = head + struct.pack("<I", zlib.crc32(head) & 0xFFFFFFFF) + payload
        stored = fallback and len(blob) >= limit
        if stored:
            blob, payload = _stored(data), data
    seconds = time.perf_counter() - t_start
    ideal_total = None if gave_up else ideal + 8 * len(escapes)
    rep = dict(
        input_bytes=len(data),
        coded_bytes=len(blob),
        payload_bytes=len(payload),
        header_bytes=len(blob) - len(payload),
        stored=stored,
        gave_up_after_tokens=coded_tokens if gave_up else None,
        tokens=int(n),
        escape_bytes=len(escapes),
        bits_per_byte=8 * len(blob) / max(len(data), 1),
        ideal_bits=ideal_total,
        ideal_bits_per_byte=None if gave_up else ideal_total / max(len(data), 1),
        overhead_bytes=None if gave_up else len(blob) - ideal_total / 8,
        overhead_fraction=None if gave_up else (len(blob) - ideal_total / 8) / max(ideal_total / 8, 1e-9),
        seconds=seconds,
        model_seconds=model_seconds,
        coder_seconds=coder_seconds,
        kb_per_s=len(data) / 1e3 / max(seconds, 1e-9),
        tokens_per_s=n / max(seconds, 1e-9),
        context=context,
        chunk_len=chunk_len,
        batch_size=batch_size,
        cache_capacity=p.capacity,
        cache_bytes=cache_bytes(m.cfg, batch_size, p.capacity) if p.windows else 0,
        devices=1 if sharding is None else sharding_lib.row_shards(sharding),
    )
    return blob, rep


def _varint(mv, pos: int) -> tuple[int, int]:
    try:
        values, pos = entropy.read_varints(mv, pos, 1)
    except errors.CorruptData:
        raise errors.CorruptData("the coded file is truncated inside its header") from None
    return int(values[0]), pos


# A coded file never claims more than this many output bytes per byte of its own (plus 1 MiB): LM coding of real
# data stays far below it (1.1 bits per byte is 7x), and it bounds what a damaged or crafted header can allocate.
MAX_EXPANSION = 2**20
MAX_STREAMS = 1024  # batch sizes above the token count are refused past this many streams


def _check_limits(header: dict, n_runs: int, size: int, pos: int) -> None:
    """Refuses header fields that no `encode` writes, before anything is allocated from them."""

    def bad(what):
        raise errors.CorruptData(f"the coded file's header {what} (the file is damaged)")

    if n_runs > size - pos:
        bad(f"lists {n_runs:,} runs in {size - pos:,} bytes")
    if header["length"] > MAX_EXPANSION * size + 2**20:
        bad(f"claims {header['length']:,} bytes of output from a file of {size:,}")
    if header["tokens"] > header["length"]:
        bad(f"claims {header['tokens']:,} tokens for {header['length']:,} bytes")
    if not 1 <= header["batch_size"] <= max(header["tokens"], MAX_STREAMS):
        bad(f"claims {header['batch_size']:,} streams for {header['tokens']:,} tokens")
    if not 1 <= header["chunk_len"] <= header["context"] <= 2**24:
        bad(f"has window {header['chunk_len']:,} in context {header['context']:,}")
    if header["coder_bytes"] + header["escapes"] > size:
        bad(f"claims {header['coder_bytes'] + header['escapes']:,} payload bytes in a file of {size:,}")


def read_header(blob: bytes) -> tuple[dict, bytes]:
    """(header, payload) of a coded file, after the magic, version, header CRC and payload CRC checks.

    A stored file gives {"stored": True, "length": ...} and the input itself as the payload.
    """
    mv = memoryview(blob)
    if len(mv) < STORED_OVERHEAD:
        raise errors.CorruptData(f"a coded file of {len(mv)} bytes is too short for its header")
    magic, version, flags = bytes(mv[:4]), mv[4], mv[5]
    if magic != MAGIC:
        raise errors.CorruptData(f"not a ziplm coded file (wrong magic {magic!r})")
    if version != VERSION:
        hint = " (written by an older ziplm: decode it with that version)" if version < VERSION else ""
        raise errors.CorruptData(f"coded file format version {version}; this ziplm reads version {VERSION}{hint}")
    if flags & ~STORED:
        raise errors.CorruptData(f"the coded file has unknown flags {flags:#04x} (the file is damaged)")
    if flags & STORED:
        (want,) = struct.unpack_from("<I", mv, len(mv) - 4)
        if zlib.crc32(mv[:-4]) & 0xFFFFFFFF != want:
            raise errors.CorruptData("the stored file fails its checksum (the file is damaged or truncated)")
        payload = bytes(mv[6:-4])
        return dict(stored=True, length=len(payload), header_bytes=STORED_OVERHEAD), payload
    if len(mv) < _FIXED.size + 4:
        raise errors.CorruptData(f"a coded file of {len(mv)} bytes is too short for its header")
    _, _, _, model, tokenizer, digest, payload_crc = _FIXED.unpack_from(mv, 0)
    pos, values = _FIXED.size, []
    for _ in range(len(_FIELDS) + 1):
        value, pos = _varint(mv, pos)
        values.append(value)
    header = dict(zip(_FIELDS, values[:-1]))
    _check_limits(header, values[-1], len(mv), pos)
    runs = []
    for _ in range(values[-1]):
        first, pos = _varint(mv, pos)
        if first & 1:
            runs.append(["b", first >> 1, 0])
        else:
            count, pos = _varint(mv, pos)
            runs.append(["t", first >> 1, count])
    if pos + 4 > len(mv):
        raise errors.CorruptData("the coded file is truncated inside its header")
    (want,) = struct.unpack_from("<I", mv, pos)
    if zlib.crc32(mv[:pos]) & 0xFFFFFFFF != want:
        raise errors.CorruptData("the coded file's header fails its checksum (the file is damaged)")
    sums = (sum(r[1] for r in runs), sum(r[2] for r in runs), sum(r[1] for r in runs if r[0] == "b"))
    if sums != (header["length"], header["tokens"], header["escapes"]):
        raise errors.CorruptData("the coded file's header fields disagree with its runs (the file is damaged)")
    payload = bytes(mv[pos + 4 :])
    expected = header["coder_bytes"] + header["escapes"]
    if len(payload) != expected:
        raise errors.CorruptData(
            f"the coded file is truncated or padded: {len(payload)} payload bytes, expected {expected}"
        )
    if zlib.crc32(payload) & 0xFFFFFFFF != payload_crc:
        raise errors.CorruptData("the coded file's payload fails its checksum (the file is damaged)")
    header.update(
        stored=False,
        model=model.hex(),
        tokenizer=tokenizer.hex(),
        sha256_prefix=digest.hex(),
        runs=runs,
        header_bytes=pos + 4,
    )
    return header, payload


DEFAULT_MAX_OUTPUT = 2**30  # decode refuses files that claim more output than this unless told otherwise


def check_output(header: dict, max_output: int | None) -> None:
    """Refuses a file whose header claims more than `max_output` bytes of output (None or 0: no limit), before
    any model work: a crafted header cannot make a decode run for hours or fill a disk unasked."""
    if max_output and header["length"] > max_output:
        raise errors.UserError(
            f"the file claims {header['length']:,} bytes of output, more than the limit of {max_output:,}; if you"
            f" trust it, raise the limit (--max-output {header['length']}, or 0 for none)"
        )


def with_header(blob: bytes, **changes) -> bytes:
    """A coded file (not stored) with some header fields (`_FIELDS`, or `runs`) replaced and every checksum
    recomputed: the crafted files of the fault-injection tests, which only the limits can refuse."""
    header, payload = read_header(blob)
    header.update(changes)
    fields = [header[f] for f in _FIELDS] + [len(header["runs"])]
    for kind, n_bytes, n_tokens in header["runs"]:
        fields += [n_bytes << 1 | (kind == "b")] + ([n_tokens] if kind == "t" else [])
    head = bytes(blob[: _FIXED.size]) + entropy.varints(fields)
    return head + struct.pack("<I", zlib.crc32(head) & 0xFFFFFFFF) + payload


def decode(
    blob: bytes, m, sharding=None, *, out=None, max_output: int | None = DEFAULT_MAX_OUTPUT, progress=None
) -> tuple[bytes | None, dict]:
    """The bytes `encode` coded, with the model `m` (the same one: checked by fingerprint), and a report.

    A stored file (see the module docstring) needs no model: `m` may then be None. `sharding`: the encoder's.
    `out`: a binary file to write the bytes to as they are decoded (run by run; then None is returned in their
    place), so memory stays bounded whatever the file's length: decoded tokens past `IN_MEMORY_TOKENS` live in an
    unnamed temporary file. The caller commits `out` only when this returns (the hash is checked last).
    `max_output`: refuse a file that claims more bytes (`check_output`). `progress`: see `_run`.
    """
    from research.data import tokenizers

    t_start = time.perf_counter()
    header, payload = read_header(blob)
    check_output(header, max_output)
    if header["stored"]:
        seconds = time.perf_counter() - t_start
        n = len(payload)
        if out is not None:
            out.write(payload)
        return None if out is not None else payload, dict(
            output_bytes=n, stored=True, tokens=0, seconds=seconds, model_seconds=0.0, coder_seconds=0.0,
            kb_per_s=n / 1e3 / max(seconds, 1e-9), tokens_per_s=0.0,
        )  # fmt: skip
    if m is None:
        raise errors.UserError("this file was coded with a model: decode it with the model it was coded with")
    have = fingerprint(m.cfg, m.params)[:16]
    if have != header["model"]:
        raise errors.UserError(
            f"this file was coded with another model (fingerprint {header['model']}; {m.source} has {have}): "
            "decode with the model it was coded with"
        )
    context, chunk_len = _settings(m, header["context"], header["chunk_len"], header["batch_size"], sharding)
    batch_size, n = header["batch_size"], header["tokens"]
    tok = tokenizers.load(m.tokenizer)
    if _tokenizer_id(tok).hex() != header["tokenizer"]:
        raise errors.UserError(
            f"this file was coded with another tokenizer ({header['tokenizer']}; {m.source} uses {m.tokenizer}): "
            "decode with the model and tokenizer it was coded with"
        )
    coder = rangecoder.Decoder(payload[: header["coder_bytes"]])
    escapes = payload[header["coder_bytes"] :]
    coder_seconds = 0.0

    def code(freqs, sel, logp, live, pos):
        nonlocal coder_seconds
        t0 = time.perf_counter()
        freqs = distributed.to_host(freqs)
        out = np.zeros(len(live), np.int32)
        for i in np.flatnonzero(live):
            cum = np.cumsum(freqs[i], dtype=np.int64)  # (V,) inclusive
            s = int(np.searchsorted(cum, coder.target(int(cum[-1])), side="right"))
            coder.advance(int(cum[s] - freqs[i, s]), int(freqs[i, s]))
            out[i] = s
        coder_seconds += time.perf_counter() - t0
        return out

    p = plan(n, batch_size, context, chunk_len)
    streams, model_seconds = _run(m, p, batch_size, header["start_token"], code, sharding=sharding, progress=progress)
    tokens = _Concatenated(streams, p.lengths)
    digest, written, kept = hashlib.sha256(), 0, []
    try:
        for piece in _join(header["runs"], tokens, escapes, tok):
            digest.update(piece)
            written += len(piece)
            if written > header["length"]:
                break
            if out is not None:
                out.write(piece)
            else:
                kept.append(piece)
    except (OSError, errors.UserError):
        raise
    except Exception as e:  # garbage tokens from a damaged file may not even decode
        raise errors.CorruptData(
            f"the decoded tokens do not form the input ({type(e).__name__}: the file is damaged)"
        ) from None
    if written != header["length"] or digest.hexdigest()[:16] != header["sha256_prefix"]:
        raise errors.CorruptData("the decoded bytes fail the input's SHA-256 (damaged file or a changed tokenizer)")
    data = None if out is not None else b"".join(kept)
    seconds = time.perf_counter() - t_start
    rep = dict(
        output_bytes=written,
        stored=False,
        tokens=n,
        seconds=seconds,
        model_seconds=model_seconds,
        coder_seconds=coder_seconds,
        kb_per_s=written / 1e3 / max(seconds, 1e-9),
        tokens_per_s=n / max(seconds, 1e-9),
        context=context,
        cache_capacity=p.capacity,
    )
    return data, rep


class _Concatenated:
    """The streams' tokens in input order, (B, span) rows cut to their lengths, sliced without copying them all."""

    def __init__(self, streams: np.ndarray, lengths: np.ndarray):
        self.streams, self.lengths = streams, np.asarray(lengths)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)])

    def __getitem__(self, cut: slice) -> np.ndarray:
        lo, hi = cut.start, cut.stop
        rows = []
        for i in range(len(self.lengths)):
            a, b = max(lo, self.starts[i]), min(hi, self.starts[i + 1])
            if a < b:
                rows.append(np.asarray(self.streams[i, a - self.starts[i] : b - self.starts[i]]))
        return np.concatenate(rows) if rows else np.zeros(0, np.int32)
