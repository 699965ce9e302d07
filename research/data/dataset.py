"""Token splits with an on-disk cache, and a seeded, stateless batch sampler.

The train/validation split is deterministic: the first (1 - val_fraction) of the text's characters are the
training split and the rest validation (nanoGPT's split), each tokenized on its own. Token arrays are cached as
.npy files keyed by the text's hash and the tokenizer's fingerprint, under $ZIPLM_CACHE (default ~/.cache/ziplm).

`Batches(tokens, ...)(step)` is a pure function of (seed, step): the data position of a run is its step, so
resuming from a checkpoint replays exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np

from research import errors, files
from research.data import corpora


def cache_dir() -> Path:
    return Path(os.environ.get("ZIPLM_CACHE", Path.home() / ".cache" / "ziplm")).expanduser()


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_file(path) as f:
        np.save(f, arr)


def tokenize_cached(text: str, tokenizer, *, use_cache: bool = True) -> np.ndarray:
    """Tokenizes `text`, reading and writing the on-disk cache.

    Returns:
      1-D token array, uint16 when the vocabulary fits, else int32.
    """
    key = hashlib.sha256(text.encode("utf-8") + b"\0" + tokenizer.fingerprint.encode()).hexdigest()[:24]
    path = cache_dir() / "tokens" / f"{key}.npy"
    if use_cache and path.is_file():
        try:
            return np.load(path)
        except (OSError, ValueError):
            path.unlink(missing_ok=True)  # a damaged cache entry is rebuilt, never trusted
    ids = tokenizer.encode(text)
    ids = ids.astype(np.uint16 if tokenizer.vocab_size <= 65536 else np.int32)
    if use_cache:
        try:
            _atomic_save(path, ids)
        except OSError:
            pass  # a read-only cache only costs time
    return ids


@dataclasses.dataclass(frozen=True)
class Splits:
    """Tokenized train and validation splits of one corpus."""

    train: np.ndarray
    val: np.ndarray
    corpus: str
    corpus_sha256: str
    train_bytes: int
    val_bytes: int


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    if not 0.0 <= val_fraction < 1.0:
        raise errors.UserError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    cut = int(len(text) * (1.0 - val_fraction))
    return text[:cut], text[cut:]


def prepare(corpus_spec: str, tokenizer, val_fraction: float = 0.1, *, use_cache: bool = True) -> Splits:
    """Loads a corpus, splits it by characters, and tokenizes both parts (cached)."""
    corpus = corpora.load(corpus_spec)
    train_text, val_text = split_text(corpus.text, val_fraction)
    return Splits(
        train=tokenize_cached(train_text, tokenizer, use_cache=use_cache),
        val=tokenize_cached(val_text, tokenizer, use_cache=use_cache),
        corpus=corpus.name,
        corpus_sha256=corpus.sha256,
        train_bytes=len(train_text.encode("utf-8")),
        val_bytes=len(val_text.encode("utf-8")),
    )


class Batches:
    """Seeded batches of (inputs, targets) windows, a pure function of the step.

    sampling="random": each row starts at a uniform random offset (nanoGPT's get_batch).
    sampling="epoch": non-overlapping windows, reshuffled each epoch, each seen once per epoch.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, sampling: str = "random"):
        if batch_size <= 0:
            raise errors.UserError(f"batch size must be positive, got {batch_size}")
        if seq_len <= 0:
            raise errors.UserError(f"sequence length must be positive, got {seq_len}")
        if len(tokens) < seq_len + 1:
            raise errors.UserError(
                f"split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}: use a larger corpus "
                "or a shorter seq_len"
            )
        if sampling not in ("random", "epoch"):
            raise errors.UserError(f"data.sampling must be 'random' or 'epoch', got {sampling!r}")
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.seed, self.sampling = seed, sampling
        self.num_windows = (len(tokens) - 1) // seq_len

    def _starts(self, step: int) -> np.ndarray:
        if self.sampling == "random":
            rng = np.random.default_rng([self.seed, step])
            return rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        idx = step * self.batch_size + np.arange(self.batch_size)
        starts = np.empty(self.batch_size, np.int64)
        for epoch in np.unique(idx // self.num_windows):
            perm = np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_windows)
            sel = idx // self.num_windows == epoch
            starts[sel] = perm[idx[sel] % self.num_windows] * self.seq_len
        return starts

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        """The batch of a step: {"inputs": (B, T) int32, "targets": (B, T) int32}."""
        return self.rows(step, 0, self.batch_size)

    def rows(self, step: int, lo: int, hi: int) -> dict[str, np.ndarray]:
        """Rows lo .. hi-1 of the batch of a step, gathering only their tokens (one process's slice of a global
        batch: `parallel.distributed.put_batch`)."""
        rows = self._starts(step)[lo:hi, None] + np.arange(self.seq_len + 1)  # (hi - lo, T+1)
        window = self.tokens[rows].astype(np.int32)
        return {"inputs": window[:, :-1], "targets": window[:, 1:]}
