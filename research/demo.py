"""The demo (the main job): train the default model on the embedded corpus, evaluate it, summarise.

`ziplm` with no arguments (or `make demo`) trains a 0.8M-parameter GPT-2-style byte-level model on the text of
CPython's pydoc topics for a few minutes of CPU, evaluates validation loss and bits per byte, and leaves a run
directory (checkpoints, config.json, metrics.jsonl, summary.json, loss.png). Later issues extend it with
compression. Config overrides work as for `train` (`ziplm demo --config.train.steps=100`).
"""

from __future__ import annotations

from pathlib import Path

from research import config as config_lib
from research import report
from research.train import loop


def main(workdir: str | Path = "runs/demo", overrides: list[str] | None = None) -> int:
    cfg = config_lib.apply_overrides(config_lib.base_config(), overrides or [])
    summary = loop.train(cfg, workdir)
    plot = report.plot_losses(summary["workdir"])
    print("\nziplm demo: byte-level GPT-2-style model on the embedded pydoc corpus\n")
    print(report.train_table(summary))
    print(f"loss curve: {plot}")
    return 0
