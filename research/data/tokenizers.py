"""Tokenizers: byte-level (vocab 256, lossless for any bytes) and Hugging Face tokenizers from a local directory.

A tokenizer spec is a string: "byte", or "hf:<dir or hub id>", or "gguf:<file.gguf>" (the tokenizer a GGUF
file's metadata holds, built by `gguf_tokenizer` without torch and cached), or a bare directory path. Hub ids resolve
through `transformers` (and so `huggingface_hub`) when a network is available; a local directory works offline.

Every tokenizer exposes `encode(text) -> np.ndarray`, `decode(ids) -> str`, `vocab_size`, `fingerprint` (a hash
that changes when the vocabulary does, used as a cache key) and `token_bytes` (UTF-8 byte length of each token
id, used for bits per byte).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from pathlib import Path

import numpy as np

from research import errors, files

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# Files that make a directory loadable by transformers.AutoTokenizer.
_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",), ("spiece.model",))
# Everything of a tokenizer that a Hugging Face checkpoint directory may hold (copied on export).
TOKENIZER_FILE_NAMES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
)


def has_files(directory: Path) -> bool:
    """Whether `directory` holds a tokenizer `AutoTokenizer` can load offline."""
    return any(all((Path(directory) / f).is_file() for f in group) for group in _TOKENIZER_FILES)


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255, lossless for any input."""

    vocab_size = 256
    fingerprint = "byte"
    spec = "byte"

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(np.asarray(ids, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")

    added_prefix = np.zeros(0, np.int32)
    start_token = 10  # "\n": what a byte model's sequences start from when they need a first input

    @property
    def token_bytes(self) -> np.ndarray:
        return np.ones(256, np.int64)


@functools.lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's printable-unicode alphabet for bytes, inverted: char -> byte value."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    visible += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in visible:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return {c: b for b, c in enumerate(chars)}


def hub_or_error(repo_id: str, filename: str, what: str) -> None:
    """Returns when `repo_id` can come from the Hugging Face Hub (its `filename` is in the local HF cache, or the
    hub answers within 3 s); otherwise a UserError at once, instead of a minute of download retries offline."""
    import socket
    from urllib.parse import urlparse

    import huggingface_hub
    from huggingface_hub import constants

    try:
        if isinstance(huggingface_hub.try_to_load_from_cache(repo_id, filename), str):
            return
    except Exception:  # not a valid repo id for the cache: let the hub's own error speak below
        pass
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if not offline:
        url = urlparse(constants.ENDPOINT)
        try:
            socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
            return
        except OSError:
            pass
    raise errors.UserError(
        f"{what} {repo_id!r} is not a local directory, not in the Hugging Face cache, and the hub is not reachable"
        " (offline); pass a local directory"
    )


class HFTokenizer:
    """A Hugging Face tokenizer (`transformers.AutoTokenizer`) loaded from a directory or hub id.

    `fast=True` loads a directory that holds a `tokenizer.json` as `PreTrainedTokenizerFast` directly (the class
    AutoTokenizer picks for the GGUF conversions ziplm caches): AutoTokenizer imports transformers' config classes,
    which import torch where it is installed (about 180 MB of RSS).
    """

    def __init__(self, name: str, fast: bool = False):
        path = Path(name).expanduser()
        if path.exists():
            if not path.is_dir():
                raise errors.UserError(f"tokenizer path {path} is a file; pass the directory that holds it")
            if not has_files(path):
                wanted = ", or ".join(" + ".join(g) for g in _TOKENIZER_FILES)
                raise errors.UserError(f"tokenizer directory {path} has no tokenizer files (expected {wanted})")
            name = str(path.resolve())
        elif name.startswith((".", "/", "~")) or name.count("/") > 1:
            raise errors.UserError(f"tokenizer directory {name} does not exist")
        else:
            hub_or_error(name, "tokenizer_config.json", what="tokenizer")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        if fast:
            from transformers import PreTrainedTokenizerFast as AutoTokenizer
        else:
            from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(name)
        except OSError as e:  # hub id unreachable or unknown
            raise errors.UserError(f"cannot load tokenizer {name!r} (offline, or not a tokenizer): {e}") from None
        except Exception as e:  # damaged files: transformers raises many types
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise errors.UserError(f"cannot load tokenizer from {name}: {type(e).__name__}: {first}") from None
        self.spec = f"hf:{name}"
        self.vocab_size = len(self._tok)

    @functools.cached_property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        vocab = self._tok.get_vocab()
        for token in sorted(vocab, key=vocab.get):
            h.update(token.encode("utf-8", "surrogatepass") + b"\0")
        h.update(repr(self._tok.backend_tokenizer.to_str() if self._tok.is_fast else "").encode())
        return "hf-" + h.hexdigest()[:16]

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False), dtype=np.int32)

    def decode(self, ids) -> str:
        return self._tok.decode(np.asarray(ids).tolist(), clean_up_tokenization_spaces=False)

    @functools.cached_property
    def start_token(self) -> int:
        """The id a sequence starts from when it needs a first input: BOS, else EOS, else 0."""
        for tid in (self._tok.bos_token_id, self._tok.eos_token_id):
            if tid is not None:
                return int(tid)
        return 0

    @functools.cached_property
    def added_prefix(self) -> np.ndarray:
        """Ids that `tokenizer(text)` puts before the text by default (BOS for OPT and Llama; none for GPT-2).

        `encode` never adds them (it must round-trip bytes); the GPTQ evaluation protocol, which tokenizes with
        the defaults, prepends them.
        """
        plain = self._tok.encode("a", add_special_tokens=False)
        full = self._tok("a")["input_ids"]
        cut = len(full) - len(plain)
        return np.asarray(full[:cut] if cut > 0 and full[cut:] == plain else [], np.int32)

    @functools.cached_property
    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes of text each token id stands for.

        Exact for byte-level BPE (GPT-2, Llama 3, Qwen2, Pythia) and for SentencePiece-style vocabularies with
        byte fallback (Llama 2, Mistral: "<0xE2>" is one byte, "▁" one space); otherwise the length of the
        token's decoded text. Special tokens count the text they are written as, since they only appear in
        encoded text where that text appeared (`encode` adds none).
        """
        tokens = self._tok.convert_ids_to_tokens(list(range(self.vocab_size)))
        decoder = repr(self._tok.backend_tokenizer.decoder) if self._tok.is_fast else ""
        byte_level, metaspace = "ByteLevel" in decoder, "Metaspace" in decoder or "▁" in decoder
        table = _byte_level_decoder()
        out = np.zeros(self.vocab_size, np.int64)
        for i, t in enumerate(tokens):
            if t is None:
                continue
            if byte_level and all(c in table for c in t):
                out[i] = len(t)
            elif _BYTE_TOKEN.fullmatch(t):
                out[i] = 1
            elif metaspace:
                out[i] = len(t.replace("▁", " ").encode("utf-8"))
            else:
                out[i] = len(self._tok.decode([i]).encode("utf-8"))
        return out


# Bumped whenever `gguf_tokenizer.build` changes what it makes, so a cached conversion of an older build is not used.
GGUF_BUILD = 2


def gguf_directory(path) -> Path:
    """A tokenizer directory for the tokenizer a GGUF file's metadata holds, built once and cached.

    The tokenizer is built from the file's `tokenizer.ggml.*` metadata by `gguf_tokenizer.build` (no torch) and saved
    under `$ZIPLM_CACHE/tokenizers/gguf-<key>/`, the key a hash of the file's path, size and modification time and of
    the builder's version, written to a temporary directory renamed into place.
    """
    from research.data import gguf_tokenizer

    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise errors.UserError(f"GGUF file {path} does not exist (its tokenizer is read from it)")
    st = path.stat()
    key = hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{GGUF_BUILD}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("ZIPLM_CACHE", "~/.cache/ziplm")).expanduser() / "tokenizers"
    target = root / f"gguf-{key}"
    if has_files(target):
        return target
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    tok = gguf_tokenizer.build(path)
    try:
        with files.AtomicDir(target) as tmp:
            tok.save_pretrained(str(tmp))
    except errors.UserError:
        if not has_files(target):  # another process may have won the race; anything else is an error
            raise
    return target


def load(spec: str) -> ByteTokenizer | HFTokenizer:
    """Returns the tokenizer a spec names ("byte", "hf:<dir or id>", "gguf:<file.gguf>", or a directory)."""
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith("gguf:"):
        tok = HFTokenizer(str(gguf_directory(spec.removeprefix("gguf:"))), fast=True)
        tok.spec = spec
        return tok
    return HFTokenizer(spec.removeprefix("hf:"))
