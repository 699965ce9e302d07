"""What a calibration walk has finished, block by block, so that an interrupted compress resumes where it stopped.

    j = journal.Journal(partial / "calibration" / "00-gptq")
    j.put(i, key, value)          # after block i: its new kernels and the method's records, written atomically
    j.get(i, key)                 # on the rerun: the same value, or None (absent, damaged, or made from other weights)

`calib.walk` keeps one per walk (`Calibration.journal`, a directory inside the compress run's `.partial`
directory): after a block is rewritten it saves the new kernels and what the method recorded for the block (GPTQ's
codes and scales, SparseGPT's masks and deltas, ...); a rerun of the same config replays the saved blocks instead of
recomputing them, recomputes the activations through them (the same jitted calls on the same inputs: the same
bits), and continues at the first unfinished block, so the packed file equals an uninterrupted run's byte for
byte. An entry is keyed by a SHA-256 of the block's input kernels and calibration statistic: one made from other
weights (another model at the same path) is not used. Each file carries a SHA-256 of its payload: a damaged entry
is named in a warning and recomputed, never used. Entries are pickles of NumPy arrays written by ziplm into its
own run directory; they are not an exchange format (do not load one from elsewhere).
"""

from __future__ import annotations

import hashlib
import pickle
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from research import files

MAGIC = b"ZLMJRNL1"


def key(kernels: dict, stat: str) -> str:
    """The SHA-256 of a block's input kernels ({name: array}) and the statistic kind: what an entry was made from."""
    h = hashlib.sha256(stat.encode())
    for name in sorted(kernels):
        a = np.asarray(kernels[name])
        h.update(f"{name}\0{a.dtype}\0{a.shape}\0".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


class Journal:
    """A directory of per-block entries (see the module docstring)."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)

    def _path(self, i: int) -> Path:
        return self.dir / f"block-{i:05d}.pkl"

    def put(self, i: int, key: str, value) -> None:
        """Saves `value` (a pytree of arrays, tuples, dicts and None) for block `i`, made from inputs `key`."""
        payload = pickle.dumps((key, jax.tree.map(np.asarray, value)), protocol=pickle.HIGHEST_PROTOCOL)
        self.dir.mkdir(parents=True, exist_ok=True)
        files.write_bytes(self._path(i), MAGIC + hashlib.sha256(payload).digest() + payload)

    def get(self, i: int, key: str):
        """Block `i`'s saved value as device arrays, or None when there is none made from inputs `key`."""
        path = self._path(i)
        if not path.is_file():
            return None
        data = path.read_bytes()
        payload = data[len(MAGIC) + 32 :]
        if data[: len(MAGIC)] != MAGIC or hashlib.sha256(payload).digest() != data[len(MAGIC) : len(MAGIC) + 32]:
            print(f"warning: {path} is damaged; block {i} is calibrated again", file=sys.stderr)
            return None
        saved_key, value = pickle.loads(payload)
        if saved_key != key:
            print(f"warning: {path} was made from other weights; block {i} is calibrated again", file=sys.stderr)
            return None
        return jax.tree.map(jnp.asarray, value)

    def count(self) -> int:
        """How many blocks have entries (of any key)."""
        return len(list(self.dir.glob("block-*.pkl"))) if self.dir.is_dir() else 0
