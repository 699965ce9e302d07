"""Deep Compression's order in one config: prune -> fine-tune -> share (train centroids), on Tiny Shakespeare.

Command:
    ziplm compress --config experiments/configs/deep_compression.py

Magnitude pruning to 50% of the block linear kernels, 200 steps of fine-tuning with the masks held, then 4-bit
codebooks per output channel (16 centroids, linear init; pruned weights take no centroid, entries stored in
float16), then 200 more steps that train the centroids (gradients of the weights sharing a centroid summed,
indices fixed).

Expected (validation loss, nats/char), measured on the study model retrained on the 2-core CPU machine
(`ziplm train --config experiments/configs/shakespeare_char_cpu.py`): dense 1.8271; pruned and fine-tuned 1.8162
(summary "stages"); with 4-bit codebooks 1.8171, after training the centroids 1.8172 (training the centroids at
this learning rate gains nothing; see the quantization study). About 5 minutes on one CPU core. The final 200
steps continue the batch stream after the stage's 200 (before that fix they repeated the stage's batches: dense
1.8260, then 1.8130, 1.8146, 1.8147 on an earlier retrained model).
"""

from pathlib import Path

from research.compress import pipeline

ROOT = Path(__file__).resolve().parents[2]


def get_config():
    c = pipeline.base_config()
    c.model = str(ROOT / "runs" / "shakespeare_char_cpu")
    c.compress = [
        dict(method="magnitude", sparsity=0.5),
        dict(finetune=200),
        dict(method="codebook", bits=4, granularity="channel", lr=1e-3, entry_dtype="float16"),
    ]
    c.calibration.n = 0
    c.finetune.update(steps=200, lr=3e-4, min_lr=3e-5, warmup_steps=10, log_every=20)
    c.eval.batch_size = 256
    return c
