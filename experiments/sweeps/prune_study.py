"""Pruning study on the Tiny Shakespeare model: magnitude, Wanda and SparseGPT at 10-90% and 2:4 / 4:8, each
one-shot and after 200 fine-tuning steps with the masks held, plus the dense model fine-tuned as long (the
control). 34 compress points, ~45 min on 2 CPU cores (about 80 s each).

    ziplm sweep experiments/sweeps/prune_study.py [--jobs 2] [--only wanda]
    python experiments/prune_study.py      # the sweep, then experiments/results/prune_study.json and .png

Settings: experiments/sweeps/study.py. Expected at 50% one-shot (the papers' ordering on large models): SparseGPT
<= Wanda <= magnitude in validation loss; results/prune_study.json says what happened.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.sweeps import study  # noqa: E402

METHODS = ["magnitude", "wanda", "sparsegpt"]
LEVELS = [
    *({"label": f"{s:.0%}", "compress.0.sparsity": s} for s in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)),
    {"label": "2:4", "compress.0.pattern": "2:4"},
    {"label": "4:8", "compress.0.pattern": "4:8"},
]


def get_config():
    return dict(
        name="prune_study",
        job="compress",
        workdir=str(study.ROOT / "runs" / "sweeps" / "prune_study"),
        base=study.base(finetune_steps=200),
        axes=[{"compress.0.method": METHODS}, LEVELS],
        extra=[{"label": "dense + ft", "compress.0.sparsity": 0.0}],
        collect={
            "sparsity": "sparsity",
            "oneshot_loss": "compressed.loss",
            "finetuned_loss": "finetuned.loss",
            "oneshot_bits_per_byte": "compressed.bits_per_byte",
            "finetuned_bits_per_byte": "finetuned.bits_per_byte",
            "finetune_seconds": "finetune.seconds",
        },
        plot=[
            dict(x="sparsity", y="oneshot_loss", hue="method", logy=True, title="one-shot"),
            dict(x="sparsity", y="finetuned_loss", hue="method", logy=True, title="fine-tuned 200 steps"),
        ],
    )
