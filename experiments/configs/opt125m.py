"""OPT-125M through the rows of the published SparseGPT, Wanda and GPTQ tables, with the GPTQ protocol on WikiText-2.

Commands (the model: a local Hugging Face directory of facebook/opt-125m with its tokenizer files, or the hub id
`facebook/opt-125m` where a network is available):
    ziplm compress --config experiments/configs/opt125m.py:sparsegpt50 --model /path/to/opt-125m
    python experiments/published_tables.py gptq --model /path/to/opt-125m    # a whole table, measured vs the paper

The argument is a row name of ROWS. Protocol: WikiText-2 raw test (`wiki.test.raw`, rows joined with "\\n\\n",
tokenized once with the tokenizer's default prefix, OPT's `</s>`), disjoint windows of 2048 tokens, the first
token of each unscored, every window (`eval.max_windows=None`), as in the reference scripts (IST-DASLab/gptq,
IST-DASLab/sparsegpt, locuslab/wanda). Calibration: 128 windows of 2048 tokens, the papers' size, but of the
WikiText-2 *validation* split (`wiki.valid.tokens`, the tokenized release with its `<unk>`s) instead of C4, which
is not available offline here: expect the pruned and quantized rows to differ from the papers' by that much.

Grid conventions (see `research/compress/quant/gptq.py`): per-channel (per output row) asymmetric min/max grids
with an integer zero point, the reference code's `Quantizer(perchannel=True, sym=False)`; 1% dampening, lazy
blocks of 128, no act-order; RTN is the same grid without error feedback (the reference's `--nearest`).
Pruning: every block linear layer to the same sparsity (magnitude per layer, the reference's `--gmp`; Wanda per
output row; SparseGPT with blocks of 128); embeddings, positions, norms and the tied head stay dense.

Expected results: not measured on this machine (no OPT-125M checkpoint can be downloaded here). The papers'
WikiText-2 perplexities for these rows: dense 27.66 (SparseGPT) / 27.65 (GPTQ); magnitude 50% 193, SparseGPT 50%
36.85, SparseGPT 4:8 58.66 (SparseGPT Table 1); RTN / GPTQ 4-bit 37.28 / 31.12, 3-bit 1.3e3 / 53.85 (GPTQ Table
3); `experiments/published_tables.py` prints them beside the measured ones.
"""

from pathlib import Path

from research.compress import pipeline

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data" / "wikitext-2"
MODEL = "facebook/opt-125m"
CHANNEL = dict(granularity="channel", symmetric=False)

ROWS = {
    "dense": [dict(method="magnitude", sparsity=0.0)],
    "magnitude50": [dict(method="magnitude", sparsity=0.5)],
    "wanda50": [dict(method="wanda", sparsity=0.5)],
    "sparsegpt50": [dict(method="sparsegpt", sparsity=0.5)],
    "magnitude24": [dict(method="magnitude", pattern="2:4")],
    "wanda24": [dict(method="wanda", pattern="2:4")],
    "sparsegpt24": [dict(method="sparsegpt", pattern="2:4")],
    "sparsegpt48": [dict(method="sparsegpt", pattern="4:8")],
    "rtn4": [dict(method="rtn", bits=4, **CHANNEL)],
    "gptq4": [dict(method="gptq", bits=4, **CHANNEL)],
    "rtn3": [dict(method="rtn", bits=3, **CHANNEL)],
    "gptq3": [dict(method="gptq", bits=3, **CHANNEL)],
}


def get_config(row: str = "sparsegpt50"):
    if row not in ROWS:
        raise ValueError(f"unknown row {row!r}; rows: {', '.join(ROWS)}")
    c = pipeline.base_config()
    c.model = MODEL
    c.compress = ROWS[row]
    c.data.corpus = str(SHARED / "tokens" / "wiki.valid.tokens")
    c.data.seq_len = 2048
    c.calibration.update(n=128, length=2048, batch_size=4, corpus=str(SHARED / "tokens" / "wiki.valid.tokens"))
    c.eval.update(
        corpus=f"wikitext:{SHARED / 'raw' / 'wiki.test.raw'}",
        protocol="gptq",
        window=2048,
        max_windows=None,
        batch_size=1,
        agreement=False,
    )
    c.wandb.mode = "disabled"
    return c
