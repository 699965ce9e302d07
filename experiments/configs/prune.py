"""One-shot pruning of the Tiny Shakespeare model to 50%, then 200 steps of fine-tuning with the masks held.

Commands (the model is the run of `ziplm train --config experiments/configs/shakespeare_char_cpu.py`):
    ziplm compress --config experiments/configs/prune.py:magnitude
    ziplm compress --config experiments/configs/prune.py:wanda
    ziplm compress --config experiments/configs/prune.py:sparsegpt
    ziplm compress --config experiments/configs/prune.py:sparsegpt --config.compress.0.pattern=2:4

The argument is any registered method (research.compress.registry.METHODS). Calibration: 128 training windows of
64 characters. Expected validation losses (nats/char, dense 1.8252): see experiments/results/prune_study.json,
which holds the same settings for every method and sparsity (`python experiments/prune_study.py`).
"""

from pathlib import Path

from research.compress import pipeline

ROOT = Path(__file__).resolve().parents[2]


def get_config(method: str = "magnitude"):
    c = pipeline.base_config()
    c.model = str(ROOT / "runs" / "shakespeare_char_cpu")
    c.compress = [dict(method=method, sparsity=0.5)]
    c.calibration.update(n=128, length=2048, batch_size=32)  # length capped at the model's 64-token context
    c.finetune.update(steps=200, lr=3e-4, min_lr=3e-5, warmup_steps=10, log_every=20)
    c.eval.batch_size = 256
    return c
