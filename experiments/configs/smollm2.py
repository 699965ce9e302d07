"""SmolLM2-135M (a real pretrained LLM) through one compression method, with the GPTQ protocol on WikiText-2.

Commands (the model: `ziplm pull smollm2-135m`, the Q4_1 GGUF file of SmolLM2-135M-Instruct, Apache-2.0):
    ziplm compress --config experiments/configs/smollm2.py:gptq4_g128
    ziplm compress --config experiments/configs/smollm2.py:sparsegpt50 --config.eval.max_windows=140
    python experiments/llm_tables.py        # every row below, into experiments/results/llm_tables.json

The argument is a row name of ROWS. Protocol: WikiText-2 raw test (`wiki.test.raw`, rows joined with "\\n\\n"),
disjoint windows of 2048 tokens, the first token of each unscored (the GPTQ/SparseGPT protocol; 140 windows in all;
`eval.max_windows` takes a prefix, 16 by default on CPU). Calibration: `calibration.n` windows of
`calibration.length` tokens at seeded random offsets of the WikiText-2 *validation* split (the tokenized release,
`wiki.valid.tokens`, with its `<unk>`s: the only validation text at hand), which is disjoint from the evaluated
test text; the reference scripts use 128 x 2048 tokens of C4 (or WikiText-2 train), this config 32 x 2048 by
default on CPU (`--config.calibration.n=128` for the full size). "<row>+raw" (e.g. `smollm2.py:gptq4_g128+raw`)
calibrates on raw text instead: `RAW_CALIBRATION`, WikiText-2 test beyond the first 32 evaluated windows, without
the validation release's `<unk>`s and tokenization. Every row also reports KL(dense || compressed) per token and
top-1 agreement with the dense model, and the packed file's size.

Expected results: experiments/results/llm_tables.json (dense: perplexity 20.71, 1.0740 bits per byte on the first
16 windows; the same perplexity as `transformers` on the same windows).

Grid conventions (see `research/compress/quant/gptq.py`): asymmetric with an integer zero point, group scales
fitted at the start of each lazy block (the reference code's defaults); act-order off; 1% dampening.
The dense model is a Q4_1 model: its block matrices already lie on 4-bit grids of 32 with fp16 scale and minimum.
"""

import math
from pathlib import Path

from research.compress import pipeline

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data" / "wikitext-2"
G128 = dict(granularity="group", group_size=128)

ROWS = {
    "dense": [dict(method="magnitude", sparsity=0.0)],
    "magnitude50": [dict(method="magnitude", sparsity=0.5)],
    "wanda50": [dict(method="wanda", sparsity=0.5)],
    "sparsegpt50": [dict(method="sparsegpt", sparsity=0.5)],
    "magnitude24": [dict(method="magnitude", pattern="2:4")],
    "wanda24": [dict(method="wanda", pattern="2:4")],
    "sparsegpt24": [dict(method="sparsegpt", pattern="2:4")],
    "rtn4_channel": [dict(method="rtn", bits=4, granularity="channel")],
    "gptq4_channel": [dict(method="gptq", bits=4, granularity="channel")],
    "rtn4_g128": [dict(method="rtn", bits=4, **G128)],
    "gptq4_g128": [dict(method="gptq", bits=4, **G128)],
    "rtn3_g128": [dict(method="rtn", bits=3, **G128)],
    "gptq3_g128": [dict(method="gptq", bits=3, **G128)],
    "codebook4": [dict(method="codebook", bits=4, granularity="channel", entry_dtype="float16")],
    "sparsegpt50_gptq4": [dict(method="sparsegpt", sparsity=0.5), dict(method="gptq", bits=4, **G128)],
    "gptq_q4_0": [dict(method="gptq", gguf="q4_0")],  # GPTQ on Q4_0's grid: `ziplm export --format gguf` keeps it
    "q4_1_requant": [
        dict(method="rtn", bits=4, granularity="group", group_size=32, zero="float", param_dtype="float16")
    ],
}


# Mixed precision (`research/compress/mixed.py`): per block matrix Q4_1's own grid (exact on this model) or 3 bits
# on the same grid, per embedding row block of 32 (tied: also the head) 8 bits (Q8_0's grid: exact) or 6 / 5 / 4;
# the smallest file whose measured loss increase (each leaf alone, on 4 x 512 calibration tokens; the sum over
# leaves) is within ln(1.01) / ln(1.05) nats per token (1% / 5% of perplexity). (The Fisher estimate was tried
# first: its scale is off by ~300x here, see mixed.py.)
Q41 = dict(method="rtn", granularity="group", group_size=32, zero="float", param_dtype="float16")
ROW32 = dict(method="rtn", granularity="row-group", group_size=32, param_dtype="float16", where="embed/embedding")
MIXED_OPTIONS = [
    *[dict(Q41, bits=b, where=r"layers/\d+/(attn|mlp)/\w+/kernel") for b in (4, 3)],
    dict(ROW32, bits=8, symmetric=True),
    *[dict(ROW32, bits=b, zero="float", symmetric=False) for b in (6, 5, 4)],
]
for pct in (1, 5):
    ROWS[f"mixed_{pct}pct"] = [
        dict(
            method="mixed",
            options=MIXED_OPTIONS,
            where=r"layers/\d+/(attn|mlp)/\w+/kernel|embed/embedding",
            max_loss_increase=round(math.log(1 + pct / 100), 6),
            sensitivity="loss",
        )
    ]


# Raw in-domain calibration text (the "+raw" rows): WikiText-2 *test* from character 300,000 on, which lies beyond
# the first 32 evaluated windows (65,536 tokens end near character 275,000), so it is disjoint from them; with
# more windows (eval.max_windows > 32) it would overlap the evaluated text.
RAW_CALIBRATION = f"slice:300000::wikitext:{SHARED / 'raw' / 'wiki.test.raw'}"
RAW_MAX_WINDOWS = 32


def get_config(row: str = "gptq4_g128"):
    row, raw = row.removesuffix("+raw"), row.endswith("+raw")
    if row not in ROWS:
        raise ValueError(f"unknown row {row!r}; rows: {', '.join(ROWS)} (each also as <row>+raw)")
    c = pipeline.base_config()
    c.model = "smollm2-135m"
    c.compress = ROWS[row]
    c.data.corpus = str(SHARED / "tokens" / "wiki.valid.tokens")
    c.data.seq_len = 2048
    c.calibration.update(n=32, length=2048, batch_size=4, corpus=str(SHARED / "tokens" / "wiki.valid.tokens"))
    c.eval.update(
        corpus=f"wikitext:{SHARED / 'raw' / 'wiki.test.raw'}",
        protocol="gptq",
        window=2048,
        max_windows=16,
        batch_size=1,
        agreement=True,
    )
    if raw:
        c.calibration.corpus = RAW_CALIBRATION
    if row.startswith("mixed"):
        c.calibration.update(n=4, length=512, batch_size=4)  # one forward pass per (leaf, option): keep it short
    c.wandb.mode = "disabled"
    return c
