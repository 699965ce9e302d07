"""Metric logging: a local JSONL file first, W&B as a mirror. Process 0 only.

Every logged record is one JSON line in `<run dir>/metrics.jsonl` ({"step": ..., "split": ..., metrics...}). W&B
runs offline by default (files under `<run dir>/wandb`, no network, no account); set `wandb.mode="online"` in the
config, or WANDB_MODE in the environment, to sync. A W&B failure never stops a run: it is reported once and the run
goes on with the local file. Tests set WANDB_MODE=disabled.
"""

from __future__ import annotations

import json
import math
import os
import sys
import uuid
from pathlib import Path

import jax
import numpy as np

from research import files


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file ([] when it is missing). A line that does not parse as a JSON object (a torn
    last line after a crash, a damaged one) is skipped with a warning naming it, never an exception."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            print(f"warning: {path}:{i} is not a JSON record (damaged or torn); skipped", file=sys.stderr)
            continue
        records.append(record)
    return records


class Logger:
    """Writes metrics to `<workdir>/metrics.jsonl` and, when enabled, to W&B.

    Args:
      workdir: the run directory.
      config: the run config as a plain dict (W&B's run config).
      wandb_cfg: {"mode", "project", "entity", "name"}, and optionally "group", "job_type" (a sweep's name and
        the point's methods) and "sweep" (JSON of {"point": name, override key: value, ...}, added to the W&B config).
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
            files.write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in keep).encode())
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
            sweep = wandb_cfg.get("sweep")
            self._wandb = wandb.init(
                project=wandb_cfg.get("project"),
                entity=wandb_cfg.get("entity"),
                name=wandb_cfg.get("name"),
                group=wandb_cfg.get("group"),
                job_type=wandb_cfg.get("job_type"),
                dir=str(workdir),
                config={**config, "sweep": json.loads(sweep)} if sweep else config,
                mode=mode,
                # Under `wandb agent` the agent names the run; else one id per run directory, kept on resume.
                id=None if os.environ.get("WANDB_SWEEP_ID") else run_id,
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


def numeric(d: dict) -> dict:
    """The finite numbers of a metrics dict (what a log record and W&B take), without strings and None."""
    return {
        k: v
        for k, v in d.items()
        if isinstance(v, int | float | np.floating) and not isinstance(v, bool) and math.isfinite(float(v))
    }


def _plain(v):
    if hasattr(v, "item"):
        return v.item()
    return v
