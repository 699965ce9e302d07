"""A small Llama-style model (RoPE, RMSNorm, SwiGLU, grouped-query attention) on Tiny Shakespeare with GPT-2 BPE.

Shows the Llama family and a Hugging Face tokenizer loaded offline from ../shared/data/gpt2-tokenizer.

Command:
    ziplm train --config experiments/configs/llama_shakespeare_bpe.py

Expected (2-core CPU, about 5 minutes, most of it in the 50k-token output head): validation loss about 5.07
nats/token after 300 steps of 8 x 128 tokens, i.e. 2.36 bits per byte, the number to compare with byte-level
models.
"""

import os
from pathlib import Path

from research import config
from research.models import config as model_config

DATA = Path(os.environ.get("ZIPLM_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))


def get_config():
    c = config.base_config()
    c.model = model_config.llama_style(
        vocab_size=50304, n_layer=4, n_head=4, n_kv_head=2, d_model=128, max_seq_len=128
    ).to_dict()
    c.data.update(
        corpus=str(DATA / "tinyshakespeare" / "input.txt"),
        tokenizer=str(DATA / "gpt2-tokenizer"),
        val_fraction=0.1,
        seq_len=128,
        batch_size=8,
        sampling="random",
    )
    c.train.update(steps=300, lr=2e-3, min_lr=2e-4, warmup_steps=30, eval_every=100, ckpt_every=100)
    return c
