"""Metric logging: a local JSONL file first, W&B as a mirror. Process 0 only.

Every logged record is one JSON line in `<run dir>/metrics.jsonl` ({"step": ..., "split": ..., metrics...}). W&B
runs offline by default (files under `<run dir>/wandb`, no network, no account); set `wandb.mode="online"` in the
config, or WANDB_MODE in the environment, to sync. A W&B failure never stops a run: it is reported once and the run
goes on with the local file. Tests set WANDB_MODE=disabled.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import jax

from research import errors


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_json_atomic(path: Path, obj) -> None:
    """Writes JSON to a temporary file and renames it over `path`, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def write_bytes_atomic(path, data: bytes, *, overwrite: bool = False) -> Path:
    """Writes a file through a temporary file beside it, renamed into place; an existing file is refused unless
    `overwrite` (a UserError, as is a missing directory). Returns the resolved path."""
    target = Path(path).expanduser().resolve()
    if target.exists() and not overwrite:
        raise errors.UserError(f"{target} exists; pass --overwrite to replace it")
    if not target.parent.is_dir():
        raise errors.UserError(f"the directory of {target} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


class Logger:
    """Writes metrics to `<workdir>/metrics.jsonl` and, when enabled, to W&B.

    Args:
      workdir: the run directory.
      config: the run config as a plain dict (W&B's run config).
      wandb_cfg: {"mode", "project", "entity", "name"}.
      resume_step: on resume, records after this step (from the interrupted run, beyond its last checkpoint)
        are dropped from the JSONL, so the file holds one trajectory.
    """

    def __init__(self, workdir: Path, config: dict, wandb_cfg: dict, resume_step: int | None = None):
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self._wandb = None
        if not self.enabled:
            return
        if resume_step is not None and self.path.exists():
            keep = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
            os.replace(tmp, self.path)
        elif resume_step is None:
            self.path.write_text("")
        self._file = self.path.open("a")
        self._init_wandb(Path(workdir), config, wandb_cfg)

    def _init_wandb(self, workdir: Path, config: dict, wandb_cfg: dict) -> None:
        mode = os.environ.get("WANDB_MODE") or wandb_cfg.get("mode") or "offline"
        if mode == "disabled":
            return
        id_file = workdir / "wandb_id"
        try:
            import wandb

            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            self._wandb = wandb.init(
                project=wandb_cfg.get("project"),
                entity=wandb_cfg.get("entity"),
                name=wandb_cfg.get("name"),
                dir=str(workdir),
                config=config,
                mode=mode,
                id=run_id,
                resume="allow",
                settings=wandb.Settings(silent=True, init_timeout=30),
            )
        except Exception as e:  # W&B must never stop a run
            print(
                f"warning: W&B disabled for this run ({type(e).__name__}: {e}); metrics go to {self.path}",
                file=sys.stderr,
            )
            self._wandb = None

    def log(self, step: int, metrics: dict, split: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            numeric = {f"{split}/{k}": v for k, v in record.items() if isinstance(v, int | float) and k != "step"}
            self._wandb.log(numeric, step=int(step))

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _plain(v):
    if hasattr(v, "item"):
        return v.item()
    return v


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
