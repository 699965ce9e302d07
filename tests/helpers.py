"""Shared test helpers: paths to ../shared/data and a config that trains in seconds."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
GPT2_TOKENIZER = SHARED / "gpt2-tokenizer"
SHAKESPEARE = SHARED / "tinyshakespeare" / "input.txt"
WIKITEXT_RAW = SHARED / "wikitext-2" / "raw" / "wiki.test.raw"

# The user's model cache (conftest points ZIPLM_CACHE at a temporary directory for everything else).
REAL_MODELS = (
    Path(os.environ.get("ZIPLM_REAL_CACHE", os.environ.get("ZIPLM_CACHE", "~/.cache/ziplm"))).expanduser() / "models"
)

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared data not found at {SHARED}")


def tiny_config(**train):
    """A config that trains in seconds: 2 layers, 32 wide, 8x32-token batches, single device."""
    from research import config as config_lib
    from research.models import config as model_config

    cfg = config_lib.base_config()
    cfg.model = model_config.gpt2_style(vocab_size=256, n_layer=2, n_head=2, d_model=32, max_seq_len=32).to_dict()
    cfg.data.seq_len, cfg.data.batch_size = 32, 8
    cfg.train.update(dict(steps=8, warmup_steps=2, log_every=1, eval_every=4, ckpt_every=4))
    cfg.train.update(train)
    cfg.eval.update(dict(batch_size=16, max_windows=32))
    cfg.mesh.update(dict(data=1, model=1))
    cfg.wandb.mode = "disabled"
    return cfg
