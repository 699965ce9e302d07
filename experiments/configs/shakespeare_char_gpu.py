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

from pathlib import Path

from research import config
from research.models import config as model_config


def get_config():
    c = config.load(str(Path(__file__).with_name("shakespeare_char_cpu.py")))
    c.model = model_config.gpt2_style(
        vocab_size=256, n_layer=6, n_head=6, d_model=384, max_seq_len=256, bias=False, dropout=0.2, dtype="bfloat16"
    ).to_dict()
    c.data.update(seq_len=256, batch_size=64)
    c.train.update(steps=5000, lr=1e-3, min_lr=1e-4, ckpt_every=1000)
    c.eval.batch_size = 64
    return c
