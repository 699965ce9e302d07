"""Language modeling is compression: range coding of any bytes with a model's next-token probabilities.

    blob, rep = lm.encode(data, m)          # m: a `sources.Model` (run, compressed directory, packed file, HF)
    data2, _ = lm.decode(blob, m)           # == data, or a CorruptData / UserError

Tokens. A byte-level model codes the bytes themselves. A tokenizer model codes token ids: the input is cut into
runs of valid UTF-8 and invalid bytes; each text run is tokenized and kept only if decoding its tokens gives back
its exact bytes, and every other byte is an escape byte, stored raw (8 bits) in its own section. So any input
round-trips, whatever the tokenizer does with it.

Streams and windows. The token stream is cut into `batch_size` contiguous segments, coded as parallel streams
through the KV-cache step (`models.decode.step`). Each stream advances window by window: a window codes the next
`chunk_len` tokens (default: half the model's context) one position per step, after a prefill of the
`context - chunk_len + 1` tokens before them (the first window starts from a fixed start token: the tokenizer's
BOS, else its EOS, else byte 10, "\n"), so every token after the first window sees at least that much context.
All streams take the same steps on the same shapes in the encoder and the decoder (a stream that has run out is
masked, not shortened), so both get bit-identical logits.

Coding. Logits become probabilities in float64 NumPy (a softmax both sides compute identically), which
`constriction`'s range coder quantizes deterministically (`Categorical(perfect=False)`: every symbol keeps a
non-zero probability). The coded size is the model's log-loss on the data, -sum log2 p(x_t), plus the range
coder's few bytes and the quantization loss; the report gives both, and the overhead. The overhead can be
negative: the coder's quantized model floors every probability near 2**-24, so a symbol the float model gives
less than that (out-of-domain bytes) costs at most ~24 bits, fewer than its -log2 p.

File layout (little-endian, version 1), a 40-60 byte header and the payload:

    4 bytes magic b"ZLMT", u8 version, u8 reserved
    8 bytes the model's fingerprint (the first 8 bytes of `fingerprint`), 4 bytes the tokenizer's
    8 bytes the first 8 bytes of the input's SHA-256, u32 CRC-32 of the payload
    LEB128 varints: input length, tokens, chunk length, batch size, start token, range-coder words, escape bytes,
            number of runs, then per run (bytes << 1 | is_escape) and, for text runs, its tokens
    u32 CRC-32 of everything above
    payload: the range coder's uint32 words, then the escape bytes

Decoding checks the magic, version, header CRC, payload CRC and model fingerprint before it decodes, and the
input's hash after: a different model or a damaged file is an error, never wrong output.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import time
import zlib

import numpy as np

from research import errors, tree
from research.coding import entropy

MAGIC = b"ZLMT"
VERSION = 1
_FIXED = struct.Struct("<4sBB8s4s8sI")  # magic, version, reserved, model, tokenizer, input hash, payload CRC


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


def _runs(data: bytes, tok) -> tuple[list, np.ndarray, bytes]:
    """(runs [[kind, n_bytes, n_tokens]], token ids, escape bytes) of the input (see the module docstring)."""
    if tok.spec == "byte":
        return [["t", len(data), len(data)]], np.frombuffer(data, np.uint8).astype(np.int32), b""
    runs, ids, escapes = [], [], bytearray()
    for i, part in enumerate(_ESCAPED.split(data.decode("utf-8", "surrogateescape"))):
        if not part:
            continue
        raw = part.encode("utf-8", "surrogateescape")
        t = tok.encode(part) if i % 2 == 0 else None  # odd parts are the undecodable bytes
        if t is not None and tok.decode(t).encode("utf-8") == raw:
            runs.append(["t", len(raw), len(t)])
            ids.append(t)
        else:
            runs.append(["b", len(raw), 0])
            escapes += raw
    tokens = np.concatenate(ids).astype(np.int32) if ids else np.zeros(0, np.int32)
    return runs, tokens, bytes(escapes)


def _join(runs, tokens: np.ndarray, escapes: bytes, tok) -> bytes:
    out, ti, ei = bytearray(), 0, 0
    for kind, n_bytes, n_tokens in runs:
        if kind == "b":
            out += escapes[ei : ei + n_bytes]
            ei += n_bytes
            continue
        piece = tokens[ti : ti + n_tokens]
        out += piece.astype(np.uint8).tobytes() if tok.spec == "byte" else tok.decode(piece).encode("utf-8")
        ti += n_tokens
    return bytes(out)


def _probs(logits) -> np.ndarray:
    """(B, V) float64 probabilities from (B, V) logits, computed identically by the encoder and the decoder."""
    x = np.asarray(logits, np.float64)
    x = np.exp(x - x.max(axis=-1, keepdims=True))
    return x / x.sum(axis=-1, keepdims=True)


def _segments(n: int, batch_size: int) -> tuple[int, np.ndarray]:
    """(span S, (B,) lengths): stream i codes tokens [i * S, i * S + lengths[i])."""
    span = -(-n // batch_size) if n else 0
    return span, np.clip(n - span * np.arange(batch_size), 0, span)


def _run(m, n: int, batch_size: int, chunk_len: int, start: int, predict) -> tuple[np.ndarray, float]:
    """Drives the model over the streams, window by window (see the module docstring).

    `predict(probs (B, V), live (B,) bool, pos)` returns the (B,) tokens at stream position `pos` (the encoder
    knows them; the decoder decodes them); entries where `live` is False are ignored. Returns the (B, S) tokens
    and the seconds spent in the model.
    """
    from research.models import decode

    window = m.cfg.max_seq_len
    keep = window - chunk_len + 1  # context carried into every window after the first
    span, lengths = _segments(n, batch_size)
    tokens = np.zeros((batch_size, span), np.int32)
    seconds = 0.0

    def step(cache, x):
        nonlocal seconds
        t0 = time.perf_counter()
        logits, cache = decode.step(m.graphdef, m.params, cache, x)
        out = np.asarray(logits[:, -1, :])
        seconds += time.perf_counter() - t0
        return out, cache

    for lo in range(0, span, chunk_len):
        prefix = np.full((batch_size, 1), start, np.int32) if lo == 0 else tokens[:, max(0, lo - keep) : lo]
        logits, cache = step(decode.init_cache(m.cfg, batch_size, window), prefix)
        for pos in range(lo, min(lo + chunk_len, span)):
            live = lengths > pos
            tokens[:, pos] = np.where(live, predict(_probs(logits), live, pos), 0)
            if pos + 1 < min(lo + chunk_len, span):
                logits, cache = step(cache, tokens[:, pos : pos + 1])
    return tokens, seconds


def _check(m, chunk_len: int, batch_size: int) -> None:
    for name, v in (("chunk_len", chunk_len), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise errors.UserError(f"{name} must be a positive integer, got {v!r}")
    if chunk_len > m.cfg.max_seq_len:
        raise errors.UserError(
            f"chunk_len {chunk_len} exceeds the model's context ({m.cfg.max_seq_len}); use --chunk-len "
            f"{m.cfg.max_seq_len} or less"
        )
    if m.tokenizer is None:
        raise errors.UserError(f"{m.source} names no tokenizer: the coder needs one (byte or hf:DIR)")


def encode(data: bytes, m, *, chunk_len: int | None = None, batch_size: int = 16) -> tuple[bytes, dict]:
    """The coded file of `data` under the model `m`, and the report (sizes, ideal bits, overhead, timings)."""
    import constriction

    from research.data import tokenizers

    chunk_len = chunk_len or max(1, m.cfg.max_seq_len // 2)
    _check(m, chunk_len, batch_size)
    t_start = time.perf_counter()
    tok = tokenizers.load(m.tokenizer)
    runs, tokens, escapes = _runs(bytes(data), tok)
    start = tok.start_token
    n = len(tokens)
    coder = constriction.stream.queue.RangeEncoder()
    family = constriction.stream.model.Categorical(perfect=False)
    span, lengths = _segments(n, batch_size)
    streams = np.zeros((batch_size, span), np.int32)
    for i in range(batch_size):
        streams[i, : lengths[i]] = tokens[i * span : i * span + lengths[i]]
    ideal, coder_seconds = 0.0, 0.0

    def predict(probs, live, pos):
        nonlocal ideal, coder_seconds
        sym, p = streams[live, pos], probs[live]
        t0 = time.perf_counter()
        coder.encode(sym, family, p)
        coder_seconds += time.perf_counter() - t0
        ideal += float(-np.log2(p[np.arange(len(sym)), sym]).sum())
        return streams[:, pos]

    _, model_seconds = _run(m, n, batch_size, chunk_len, start, predict)
    words = coder.get_compressed()
    payload = words.tobytes() + escapes
    fields = [len(data), n, chunk_len, batch_size, start, len(words), len(escapes), len(runs)]
    for kind, n_bytes, n_tokens in runs:
        fields += [n_bytes << 1 | (kind == "b")] + ([n_tokens] if kind == "t" else [])
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
    seconds = time.perf_counter() - t_start
    ideal_total = ideal + 8 * len(escapes)
    rep = dict(
        input_bytes=len(data),
        coded_bytes=len(blob),
        payload_bytes=len(payload),
        header_bytes=len(blob) - len(payload),
        tokens=int(n),
        escape_bytes=len(escapes),
        bits_per_byte=8 * len(blob) / max(len(data), 1),
        ideal_bits=ideal_total,
        ideal_bits_per_byte=ideal_total / max(len(data), 1),
        overhead_bytes=len(blob) - ideal_total / 8,
        overhead_fraction=(len(blob) - ideal_total / 8) / max(ideal_total / 8, 1e-9),
        seconds=seconds,
        model_seconds=model_seconds,
        coder_seconds=coder_seconds,
        kb_per_s=len(data) / 1e3 / max(seconds, 1e-9),
        chunk_len=chunk_len,
        batch_size=batch_size,
    )
    return blob, rep


def read_header(blob: bytes) -> tuple[dict, bytes]:
    """(header, payload) of a coded file, after the magic, version, header CRC and payload CRC checks."""
    mv = memoryview(blob)
    if len(mv) < _FIXED.size + 4:
        raise errors.CorruptData(f"a coded file of {len(mv)} bytes is too short for its header")
    magic, version, _, model, tokenizer, digest, payload_crc = _FIXED.unpack_from(mv, 0)
    if magic != MAGIC:
        raise errors.CorruptData(f"not a ziplm coded file (wrong magic {bytes(magic)!r})")
    if version != VERSION:
        raise errors.CorruptData(f"coded file format version {version}; this ziplm reads version {VERSION}")
    pos = _FIXED.size

    def varint():
        nonlocal pos
        value, shift = 0, 0
        while True:
            if pos >= len(mv) or shift > 63:
                raise errors.CorruptData("the coded file is truncated inside its header")
            byte = mv[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    length, n, chunk_len, batch_size, start, n_words, n_escapes, n_runs = (varint() for _ in range(8))
    runs = []
    for _ in range(n_runs):
        first = varint()
        runs.append(["b", first >> 1, 0] if first & 1 else ["t", first >> 1, varint()])
    if pos + 4 > len(mv):
        raise errors.CorruptData("the coded file is truncated inside its header")
    (want,) = struct.unpack_from("<I", mv, pos)
    if zlib.crc32(mv[:pos]) & 0xFFFFFFFF != want:
        raise errors.CorruptData("the coded file's header fails its checksum (the file is damaged)")
    payload = bytes(mv[pos + 4 :])
    if len(payload) != 4 * n_words + n_escapes:
        raise errors.CorruptData(
            f"the coded file is truncated or padded: {len(payload)} payload bytes, expected {4 * n_words + n_escapes}"
        )
    if zlib.crc32(payload) & 0xFFFFFFFF != payload_crc:
        raise errors.CorruptData("the coded file's payload fails its checksum (the file is damaged)")
    header = dict(
        model=model.hex(),
        tokenizer=tokenizer.hex(),
        sha256_prefix=digest.hex(),
        length=length,
        tokens=n,
        chunk_len=chunk_len,
        batch_size=batch_size,
        start_token=start,
        words=n_words,
        escapes=n_escapes,
        runs=runs,
        header_bytes=pos + 4,
    )
    return header, payload


def decode(blob: bytes, m) -> tuple[bytes, dict]:
    """The bytes `encode` coded, with the model `m` (the same one: checked by fingerprint), and a report."""
    import constriction

    from research.data import tokenizers

    t_start = time.perf_counter()
    header, payload = read_header(blob)
    have = fingerprint(m.cfg, m.params)[:16]
    if have != header["model"]:
        raise errors.UserError(
            f"this file was coded with another model (fingerprint {header['model']}; {m.source} has {have}): "
            "decode with the model it was coded with"
        )
    chunk_len, batch_size, n = header["chunk_len"], header["batch_size"], header["tokens"]
    _check(m, chunk_len, batch_size)
    tok = tokenizers.load(m.tokenizer)
    if _tokenizer_id(tok).hex() != header["tokenizer"]:
        raise errors.UserError(
            f"this file was coded with another tokenizer ({header['tokenizer']}; {m.source} uses {m.tokenizer}): "
            "decode with the model and tokenizer it was coded with"
        )
    words = np.frombuffer(payload[: 4 * header["words"]], np.uint32).copy()
    escapes = payload[4 * header["words"] :]
    coder = constriction.stream.queue.RangeDecoder(words)
    family = constriction.stream.model.Categorical(perfect=False)
    coder_seconds = 0.0

    def predict(probs, live, pos):
        nonlocal coder_seconds
        t0 = time.perf_counter()
        try:
            sym = np.asarray(coder.decode(family, probs[live]), np.int32)
        except Exception as e:
            raise errors.CorruptData(f"the coded payload does not decode ({e})") from None
        coder_seconds += time.perf_counter() - t0
        out = np.zeros(len(live), np.int32)
        out[live] = sym
        return out

    streams, model_seconds = _run(m, n, batch_size, chunk_len, header["start_token"], predict)
    _, lengths = _segments(n, batch_size)
    tokens = np.concatenate([streams[i, : lengths[i]] for i in range(batch_size)]) if n else np.zeros(0, np.int32)
    data = _join(header["runs"], tokens, escapes, tok)
    if len(data) != header["length"] or hashlib.sha256(data).hexdigest()[:16] != header["sha256_prefix"]:
        raise errors.CorruptData("the decoded bytes fail the input's SHA-256 (damaged file or a changed tokenizer)")
    seconds = time.perf_counter() - t_start
    rep = dict(
        output_bytes=len(data),
        seconds=seconds,
        model_seconds=model_seconds,
        coder_seconds=coder_seconds,
        kb_per_s=len(data) / 1e3 / max(seconds, 1e-9),
    )
    return data, rep
