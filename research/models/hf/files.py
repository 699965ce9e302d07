"""Reading and writing safetensors checkpoints (single file or sharded with an index), without torch.

Headers are read first, so names, shapes and dtypes can be checked against `config.json` before any tensor is
loaded; a damaged or truncated file is a one-line `UserError`, not a crash inside the reader.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy

from research import errors

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class Checkpoint:
    """The tensors of a Hugging Face checkpoint directory, opened lazily.

    Attributes:
      shapes: {name: shape} of every tensor, from the headers.
      dtypes: {name: safetensors dtype string ("F32", "BF16", "F16", ...)}.
    """

    def __init__(self, directory: Path):
        directory = Path(directory)
        if (directory / INDEX).is_file():
            try:
                weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise errors.UserError(f"{directory / INDEX} is not a valid safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        elif (directory / SINGLE).is_file():
            files = [SINGLE]
        else:
            found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
            hint = " (PyTorch .bin checkpoints are not read: convert with save_pretrained(safe_serialization=True))"
            bins = any(n.endswith(".bin") for n in found)
            raise errors.UserError(f"no {SINGLE} or {INDEX} in {directory}; it holds {found[:8]}{hint if bins else ''}")
        self._handles, self._where = {}, {}
        self.shapes, self.dtypes = {}, {}
        for name in files:
            path = directory / name
            if not path.is_file():
                raise errors.UserError(f"{path} is listed in {INDEX} but does not exist")
            handle = _open(path)
            self._handles[name] = handle
            for key in handle.keys():
                sl = handle.get_slice(key)
                self.shapes[key] = tuple(sl.get_shape())
                self.dtypes[key] = sl.get_dtype()
                self._where[key] = name

    def names(self) -> set[str]:
        return set(self.shapes)

    def get(self, name: str) -> np.ndarray:
        """The tensor `name` as a numpy array of its stored dtype (bf16 via ml_dtypes)."""
        try:
            return self._handles[self._where[name]].get_tensor(name)
        except safetensors.SafetensorError as e:
            raise errors.UserError(f"cannot read tensor {name} from {self._where[name]}: {e}") from None


def _open(path: Path):
    size = path.stat().st_size
    if size < 8:
        raise errors.UserError(f"{path} is truncated ({size} bytes): not a safetensors file")
    try:
        handle = safetensors.safe_open(str(path), framework="numpy")
    except (safetensors.SafetensorError, OSError) as e:
        raise errors.UserError(f"{path} is damaged or truncated ({size} bytes): {e}") from None
    return handle


def write(directory: Path, tensors: dict[str, np.ndarray], max_shard_bytes: int | None = None) -> list[str]:
    """Writes `tensors` to `directory` as model.safetensors, or as shards plus an index past `max_shard_bytes`.

    Returns:
      The file names written.
    """
    directory = Path(directory)
    total = sum(a.nbytes for a in tensors.values())
    meta = {"format": "pt"}
    if not max_shard_bytes or total <= max_shard_bytes:
        safetensors.numpy.save_file(tensors, str(directory / SINGLE), metadata=meta)
        return [SINGLE]
    shards, current, size = [], {}, 0
    for name, arr in tensors.items():
        if current and size + arr.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = arr
        size += arr.nbytes
    shards.append(current)
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        safetensors.numpy.save_file(shard, str(directory / fname), metadata=meta)
        files.append(fname)
        weight_map.update(dict.fromkeys(shard, fname))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index, indent=2))
    return [*files, INDEX]


class AtomicDir:
    """Builds a directory under a temporary name and moves it into place only when the block succeeds.

    An existing non-empty target is refused unless `overwrite`; with it, the old directory is replaced only after
    the new one is complete.
    """

    def __init__(self, target: Path, overwrite: bool = False):
        self.target = Path(target)
        if self.target.exists() and not self.target.is_dir():
            raise errors.UserError(f"{self.target} exists and is not a directory")
        if self.target.is_dir() and any(self.target.iterdir()) and not overwrite:
            raise errors.UserError(f"{self.target} exists and is not empty; pass --overwrite to replace it")

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            self.target.rename(old)
        self.tmp.rename(self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False
