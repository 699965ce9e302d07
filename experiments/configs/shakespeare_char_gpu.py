"""nanoGPT's GPU setting on character-level Tiny Shakespeare: 6 layers, 6 heads, 384 wide, block 256.

nanoGPT (config/train_shakespeare_char.py) reports a validation loss of 1.4697 after 5000 iterations, about
3 minutes on one A100. Same hyperparameters here: batch 64, lr 1e-3 -> 1e-4 cosine, warmup 100, beta2 0.99,
weight decay 0.1, dropout 0.2, no biases, bf16 compute with fp32 master weights.

Command:
    ziplm train --config experiments/configs/shakespeare_char_gpu.py
    python benchmarks/shakespeare_char.py gpu        (the same run, recorded in benchmarks/results/)

Expected: validation loss about 1.47 nats/char (non-overlapping 256-character windows over the whole validation
split). On CPU use --config.model.dtype=float32; it runs, slowly.
"""

import os
from pathlib import Path

from research import config
from research.models import config as model_config

DATA = Path(os.environ.get("ZIPLM_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))


def get_config():
    c = config.base_config()
    c.model = model_config.gpt2_style(
        vocab_size=256, n_layer=6, n_head=6, d_model=384, max_seq_len=256, bias=False, dropout=0.2, dtype="bfloat16"
    ).to_dict()
    c.data.update(
        corpus=str(DATA / "tinyshakespeare" / "input.txt"),
        tokenizer="byte",
        val_fraction=0.1,
        seq_len=256,
        batch_size=64,
        sampling="random",
    )
    c.train.update(
        steps=5000,
        lr=1e-3,
        min_lr=1e-4,
        warmup_steps=100,
        weight_decay=0.1,
        b1=0.9,
        b2=0.99,
        grad_clip=1.0,
        log_every=10,
        eval_every=250,
        ckpt_every=1000,
    )
    c.eval.update(window=None, stride=None, batch_size=64, max_windows=None)
    return c
