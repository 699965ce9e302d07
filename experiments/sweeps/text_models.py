"""The compressed Tiny Shakespeare models that experiments/text_compression.py codes text with: SparseGPT 50% ->
200 steps -> 4-bit GPTQ groups of 32 (configs/prune_finetune_quantize.py), magnitude 50% -> 200 steps -> 4-bit
per-channel codebooks with trained centroids (configs/deep_compression.py), W8A8 (configs/w8a8.py), and one-shot
4-bit and 3-bit GPTQ in groups of 32. Five compress points, ~6 min on 2 CPU cores.

    ziplm sweep experiments/sweeps/text_models.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.sweeps import study  # noqa: E402

GPTQ = dict(method="gptq", granularity="group", group_size=32, symmetric=True, group_fit="sweep")
POINTS = [
    {
        "label": "sparsegpt50+ft+gptq4g32",
        "compress": [dict(method="sparsegpt", sparsity=0.5), dict(finetune=200), dict(GPTQ, bits=4)],
    },
    {
        "label": "magnitude50+ft+codebook4",
        "compress": [
            dict(method="magnitude", sparsity=0.5),
            dict(finetune=200),
            dict(method="codebook", bits=4, granularity="channel", lr=1e-3, entry_dtype="float16"),
        ],
        "calibration.n": 0,
        "finetune.steps": 200,  # and 200 more steps at the end, with the codebook trained
    },
    {
        "label": "w8a8",
        "compress": [
            dict(method="gptq", bits=8, granularity="channel", symmetric=True, group_fit="sweep"),
            dict(method="act_quant", bits=8),
        ],
    },
    {"label": "gptq4g32", "compress": [dict(GPTQ, bits=4)]},
    {"label": "gptq3g32", "compress": [dict(GPTQ, bits=3)]},
]


def get_config():
    return dict(
        name="text_models",
        job="compress",
        workdir=str(study.ROOT / "runs" / "sweeps" / "text_models"),
        base=study.base(finetune_steps=0),
        axes=[POINTS],
    )
