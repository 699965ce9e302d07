"""nanoGPT's CPU "baby GPT" on character-level Tiny Shakespeare (the reference task).

nanoGPT command reproduced here (README, "I only have a macbook"):
    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 \\
        --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 \\
        --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0
nanoGPT reports a validation loss of about 1.88 nats/char.

Command:
    ziplm train --config experiments/configs/shakespeare_char_cpu.py
    python benchmarks/shakespeare_char.py cpu        (the same run, recorded in benchmarks/results/)

Expected: validation loss <= 1.88 nats/char after 2000 steps (first 90% of the characters train, last 10%
validation; non-overlapping 64-character windows over the whole validation split). Byte-level tokens equal
characters here: the file is ASCII. The vocabulary is 256 bytes rather than nanoGPT's 65 characters.
"""

import os
from pathlib import Path

from research import config
from research.models import config as model_config

DATA = Path(os.environ.get("ZIPLM_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))


def get_config():
    c = config.base_config()
    c.model = model_config.gpt2_style(
        vocab_size=256, n_layer=4, n_head=4, d_model=128, max_seq_len=64, bias=False, dropout=0.0
    ).to_dict()
    c.data.update(
        corpus=str(DATA / "tinyshakespeare" / "input.txt"),
        tokenizer="byte",
        val_fraction=0.1,
        seq_len=64,
        batch_size=12,
        sampling="random",
    )
    c.train.update(
        steps=2000,
        lr=1e-3,
        min_lr=1e-4,
        warmup_steps=100,
        weight_decay=0.1,
        b1=0.9,
        b2=0.99,
        grad_clip=1.0,
        log_every=10,
        eval_every=250,
        ckpt_every=500,
    )
    c.eval.update(window=None, stride=None, batch_size=128, max_windows=None)
    return c
