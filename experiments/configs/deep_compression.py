"""Deep Compression's order in one config: prune -> fine-tune -> share (train centroids), on Tiny Shakespeare.

Command:
    ziplm compress --config experiments/configs/deep_compression.py

Magnitude pruning to 50% of the block linear kernels, 200 steps of fine-tuning with the masks held, then 4-bit
codebooks per output channel (16 centroids, linear init; pruned weights take no centroid), then 200 more steps that
train the centroids (gradients of the weights sharing a centroid summed, indices fixed). Quantizing the codebook
entries themselves (Deep Compression stores them in a few bits) is not a transform yet.

Expected: see runs/deep_compression/summary.json; the numbers of the last run are in the README.
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
        dict(method="codebook", bits=4, granularity="channel", lr=1e-3),
    ]
    c.calibration.n = 0
    c.finetune.update(steps=200, lr=3e-4, min_lr=3e-5, warmup_steps=10, log_every=20)
    c.eval.batch_size = 256
    return c
