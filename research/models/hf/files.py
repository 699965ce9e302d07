"""Reading and writing safetensors checkpoints (single file or sharded with an index), without torch.

Headers are read first, so names, shapes and dtypes can be checked against `config.json` before any tensor is
loaded; a damaged or truncated file is a one-line `UserError`, not a crash inside the reader.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from research import errors, files

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class Checkpoint:
    """The tensors of a Hugging Face checkpoint directory, opened lazily.

    Attributes:
      shapes: {name: shape} of every tensor, from the headers.
      dtypes: {name: safetensors dtype string: "F32", "BF16" or "F16"; any other dtype is refused on opening}.
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
        self._where = {}  # name -> (path, byte offset, count)
        self.shapes, self.dtypes = {}, {}
        for name in files:
            path = directory / name
            if not path.is_file():
                raise errors.UserError(f"{path} is listed in {INDEX} but does not exist")
            _open(path)  # safetensors validates the header against the file size
            header, data_start = _header(path)
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                if info["dtype"] not in _NUMPY:
                    raise errors.UserError(f"tensor {key} has dtype {info['dtype']}; only F32, BF16 and F16 load")
                self.shapes[key] = tuple(info["shape"])
                self.dtypes[key] = info["dtype"]
                start, end = info["data_offsets"]
                self._where[key] = (path, data_start + start, end - start)

    def names(self) -> set[str]:
        return set(self.shapes)

    def get(self, name: str) -> np.ndarray:
        """The tensor `name` as a numpy array of its stored dtype (bf16 via ml_dtypes).

        Reads with plain file I/O rather than a memory map, so the file's pages do not add to the process's
        resident memory on top of the converted weights.
        """
        path, offset, nbytes = self._where[name]
        dtype = np.dtype(_NUMPY[self.dtypes[name]])
        with open(path, "rb") as f:
            f.seek(offset)
            data = np.fromfile(f, dtype=np.uint8, count=nbytes)
        if data.size != nbytes:
            raise errors.UserError(f"{path} is truncated: tensor {name} needs {nbytes} bytes, found {data.size}")
        return data.view(dtype).reshape(self.shapes[name])


_NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


def _header(path: Path) -> tuple[dict, int]:
    """The safetensors JSON header of `path` and the byte offset where its data starts."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(size)), 8 + size


def _open(path: Path):
    size = path.stat().st_size
    if size < 8:
        raise errors.UserError(f"{path} is truncated ({size} bytes): not a safetensors file")
    try:
        handle = safetensors.safe_open(str(path), framework="numpy")
    except (safetensors.SafetensorError, OSError) as e:
        raise errors.UserError(f"{path} is damaged or truncated ({size} bytes): {e}") from None
    return handle


def _save(tensors: dict, path: Path, meta: dict) -> None:
    """One safetensors file, with the permissions the umask gives (safetensors creates it 0600) and an
    operating-system failure (a full disk) as a one-line UserError."""
    try:
        safetensors.numpy.save_file(tensors, str(path), metadata=meta)
        os.chmod(path, 0o666 & ~files.umask())
    except OSError as e:
        raise files.os_error(e, f"writing {path}") from None
    except Exception as e:  # SafetensorError wraps the OS error in its message
        why = files.os_reason(e) or f"{type(e).__name__}: {str(e).strip()[:200]}"
        raise errors.UserError(f"{why} writing {path}") from None


def write(directory: Path, tensors: dict[str, np.ndarray], max_shard_bytes: int | None = None) -> list[str]:
    """Writes `tensors` to `directory` as model.safetensors, or as shards plus an index past `max_shard_bytes`.

    Returns:
      The file names written.
    """
    directory = Path(directory)
    total = sum(a.nbytes for a in tensors.values())
    meta = {"format": "pt"}
    if not max_shard_bytes or total <= max_shard_bytes:
        _save(tensors, directory / SINGLE, meta)
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
        _save(shard, directory / fname, meta)
        files.append(fname)
        weight_map.update(dict.fromkeys(shard, fname))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index, indent=2))
    return [*files, INDEX]
