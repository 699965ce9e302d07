"""Gradual magnitude pruning during fine-tuning (Zhu & Gupta): 0 -> 80% over 400 steps, masks updated every 50.

Command:
    ziplm compress --config experiments/configs/prune_gradual.py

The cubic schedule s_t = 0.8 (1 - (1 - t/400)^3) is applied at steps 50, 100, ..., 400, then 100 more steps
recover at 80%. Compare with one-shot magnitude at 80% plus the same 500 steps:
    ziplm compress --config experiments/configs/prune.py:magnitude --config.compress.0.sparsity=0.8 \\
        --config.finetune.steps=500 --workdir runs/prune_oneshot80

Expected (2-core CPU, validation loss in nats/char, dense 1.8252): gradual 1.8777 at 80%; one-shot magnitude at
80% (2.7253 before fine-tuning) reaches 1.8678 with the same 500 steps. Here the one-shot run wins: it trains 500
steps at the final mask, the gradual one only 100 (a longer recovery phase would be the fair comparison).
"""

from pathlib import Path

from research.compress import pipeline

ROOT = Path(__file__).resolve().parents[2]


def get_config():
    c = pipeline.base_config()
    c.model = str(ROOT / "runs" / "shakespeare_char_cpu")
    c.compress = [dict(method="gradual", sparsity=0.8, initial=0.0, start=0, steps=400, every=50)]
    c.calibration.n = 0
    c.finetune.update(steps=500, lr=3e-4, min_lr=3e-5, warmup_steps=10, log_every=20)
    c.eval.batch_size = 256
    return c
