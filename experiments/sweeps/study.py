"""The compress config every Tiny Shakespeare study sweep starts from (prune_study, quant_study,
lossless_frontier): the model of experiments/configs/shakespeare_char_cpu.py, its validation split, 128
calibration windows of 64 characters (seed 0), fine-tuning AdamW 3e-4 -> 3e-5 with 10 warmup steps, no weight
decay, clipping 1.0, the run's batches (12 x 64), evaluation on the whole validation split (non-overlapping windows
of 64 characters) with batches of 256.

    ziplm train --config experiments/configs/shakespeare_char_cpu.py --workdir runs/shakespeare_char_cpu
"""

import os
from pathlib import Path

from research import errors, sources
from research.compress import pipeline

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "runs" / "shakespeare_char_cpu"


def base(finetune_steps: int = 200):
    """The study's compress config (magnitude 50% until the sweep's axes say otherwise) on MODEL, or on the run
    that the environment variable ZIPLM_STUDY_MODEL names (the tests' tiny run)."""
    model = Path(os.environ.get("ZIPLM_STUDY_MODEL", MODEL))
    if not sources.is_run(model):
        raise errors.UserError(
            f"the study model {model} is missing: train it first with `ziplm train --config "
            f"experiments/configs/shakespeare_char_cpu.py --workdir {model}` (~10 min on 2 CPU cores)"
        )
    cfg = pipeline.base_config()
    cfg.model = str(model)
    cfg.calibration.update(n=128, length=64, batch_size=32)
    cfg.finetune.update(steps=finetune_steps, lr=3e-4, min_lr=3e-5, warmup_steps=10, log_every=50)
    cfg.eval.batch_size = 256
    cfg.wandb.mode = "disabled"
    return cfg
