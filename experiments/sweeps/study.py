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


def model() -> Path:
    """The study model: MODEL, or the run that the environment variable ZIPLM_STUDY_MODEL names (the tests' tiny
    run)."""
    return Path(os.environ.get("ZIPLM_STUDY_MODEL", MODEL))


def run_sweep(sweep: str, jobs: int = 1, only: str | None = None) -> tuple[int, list[dict]]:
    """What the study scripts run: trains the study model where it is missing (~10 min on 2 CPU cores), runs the
    sweep's unfinished points (`jobs` at once, those whose names match the regular expression `only`), and returns
    the sweep's exit status and its finished points."""
    from research import config as config_lib
    from research.sweep import runner
    from research.train import loop

    model_dir = model()
    if not sources.is_run(model_dir):
        print(f"training the study model into {model_dir}", flush=True)
        loop.train(config_lib.load(str(ROOT / "experiments/configs/shakespeare_char_cpu.py")), model_dir)
    status = runner.run(sweep, [], n_jobs=jobs, only=only)
    return status, runner.finished(sweep)


def base(finetune_steps: int = 200):
    """The study's compress config (magnitude 50% until the sweep's axes say otherwise) on `model()`."""
    model_dir = model()
    if not sources.is_run(model_dir):
        raise errors.UserError(
            f"the study model {model_dir} is missing: train it first with `ziplm train --config "
            f"experiments/configs/shakespeare_char_cpu.py --workdir {model_dir}` (~10 min on 2 CPU cores)"
        )
    cfg = pipeline.base_config()
    cfg.model = str(model_dir)
    cfg.calibration.update(n=128, length=64, batch_size=32)
    cfg.finetune.update(steps=finetune_steps, lr=3e-4, min_lr=3e-5, warmup_steps=10, log_every=50)
    cfg.eval.batch_size = 256
    cfg.wandb.mode = "disabled"
    return cfg
