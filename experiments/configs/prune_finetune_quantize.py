"""The seed workflow "prune -> fine-tune -> quantize" in one config, on the Tiny Shakespeare model.

Command:
    ziplm compress --config experiments/configs/prune_finetune_quantize.py

SparseGPT prunes the block linear kernels to 50% (128 calibration windows), 200 steps of fine-tuning recover with
the masks held, then GPTQ quantizes the fine-tuned weights to 4 bits in groups of 32 (pruned weights stay exactly
zero: they keep the zero code). The summary's "stages" entry holds the fine-tuned pruned model's metrics.

Expected (validation loss, nats/char), on the study model retrained on the 2-core CPU machine: dense 1.8260;
pruned and fine-tuned 1.8118 (summary "stages"); after 4-bit GPTQ 1.8135. About 3 minutes on 2 CPU cores.
(On the earlier run, dense 1.8252: 1.8112 and 1.8123.)
"""

from pathlib import Path

from research.compress import pipeline

ROOT = Path(__file__).resolve().parents[2]


def get_config():
    c = pipeline.base_config()
    c.model = str(ROOT / "runs" / "shakespeare_char_cpu")
    c.compress = [
        dict(method="sparsegpt", sparsity=0.5),
        dict(finetune=200),
        dict(method="gptq", bits=4, granularity="group", group_size=32, symmetric=True, group_fit="sweep"),
    ]
    c.calibration.update(n=128, length=64, batch_size=32)
    c.finetune.update(lr=3e-4, min_lr=3e-5, warmup_steps=10, log_every=20)
    c.eval.batch_size = 256
    return c
