"""The lossless frontier's candidates: 43 compress configs on the Tiny Shakespeare model, every method family
(pruning + fine-tuning, GPTQ, codebooks, vector codebooks, QAT, staged combinations, whole-model QAT with per-row
table grids and bfloat16 norms, `mixed` allocations under a sweep of whole-file budgets). One list group: each
point is one labelled compress list with its fine-tuning steps. ~40 min on 2 CPU cores.

    ziplm sweep experiments/sweeps/lossless_frontier.py [--only mixed]
    python experiments/lossless_frontier.py      # the sweep, then results/lossless_frontier.json, .png

Settings: experiments/sweeps/study.py. The analysis (frontier, winners within 1%) is experiments/lossless_frontier.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.sweeps import study  # noqa: E402

FT = 200
BUDGETS = (1.6, 1.8, 2.0, 2.2, 2.5, 3.0)  # bits per weight of the whole file, for the mixed rows
TABLES = "embed/embedding|pos_embed/embedding"
SMALL = r"(.*/)?\w*norm/(scale|bias)|.*/bias"
WHOLE = [  # the tables on per-row grids, the norms in bfloat16
    dict(method="qat", bits=4, where=TABLES, granularity="row"),
    dict(method="cast", dtype="bfloat16", where=SMALL),
]


def mixed_options() -> list:
    """The candidates of the mixed rows: per kernel QAT 2/3/4 bits per channel, per table 3/4/6-bit row grids,
    per norm float8 or bfloat16."""
    return [
        *[
            dict(method="qat", bits=b, granularity="channel", where=r"layers/\d+/(attn|mlp)/\w+/kernel")
            for b in (2, 3, 4)
        ],
        *[dict(method="qat", bits=b, granularity="row", where=TABLES) for b in (3, 4, 6)],
        *[dict(method="cast", dtype=d, where=SMALL) for d in ("float8_e4m3fn", "bfloat16")],
    ]


def candidates() -> dict:
    """{name: (compress list, fine-tuning steps at the end)}."""
    g32 = dict(granularity="group", group_size=32)
    sym = dict(symmetric=True, group_fit="sweep")  # the grid the committed results used (gptq's earlier default)
    out = {"dense + ft": ([dict(method="magnitude", sparsity=0.0)], FT)}
    for s in (0.3, 0.5, 0.7):
        out[f"magnitude {s:.0%} + ft"] = ([dict(method="magnitude", sparsity=s)], FT)
        out[f"sparsegpt {s:.0%} + ft"] = ([dict(method="sparsegpt", sparsity=s)], FT)
    for b in (8, 6, 5, 4, 3):
        out[f"gptq {b}-bit channel"] = ([dict(method="gptq", bits=b, granularity="channel", **sym)], 0)
        out[f"gptq {b}-bit g32"] = ([dict(method="gptq", bits=b, **g32, **sym)], 0)
    for b in (6, 5, 4, 3):
        out[f"codebook {b}-bit tensor"] = ([dict(method="codebook", bits=b, entry_dtype="float16")], 0)
    for b in (4, 3):
        out[f"codebook {b}-bit channel int8 + ft"] = (
            [dict(method="codebook", bits=b, granularity="channel", entry_dtype="int8", lr=1e-3)],
            FT,
        )
        out[f"qat {b}-bit channel + ft"] = ([dict(method="qat", bits=b, granularity="channel")], FT)
    out["qat 2-bit channel + ft"] = ([dict(method="qat", bits=2, granularity="channel")], FT)
    for b in (3, 2):
        out[f"qat {b}-bit channel + tables 4-bit rows + norms bf16 + ft"] = (
            [dict(method="qat", bits=b, granularity="channel"), *WHOLE],
            FT,
        )
    for d, bits in ((2, 4), (4, 6), (4, 8)):
        out[f"vq {bits}-bit d{d} tensor + ft"] = ([dict(method="vq", bits=bits, dim=d, lr=1e-3)], FT)
    for bpw in BUDGETS:
        spec = dict(
            method="mixed", options=mixed_options(), where=rf"layers/\d+/(attn|mlp)/\w+/kernel|{TABLES}|{SMALL}"
        )
        out[f"mixed @ {bpw} bpw + ft"] = ([dict(spec, budget_bits_per_weight=bpw)], FT)
    for s in (0.3, 0.5):
        for b in (4, 3):
            out[f"sparsegpt {s:.0%} + ft + gptq {b}-bit g32"] = (
                [dict(method="sparsegpt", sparsity=s), dict(finetune=FT), dict(method="gptq", bits=b, **g32, **sym)],
                0,
            )
        out[f"magnitude {s:.0%} + ft + codebook 4-bit tensor"] = (
            [dict(method="magnitude", sparsity=s), dict(finetune=FT), dict(method="codebook", bits=4)],
            0,
        )
    return out


def get_config():
    points = [
        dict(label=name, compress=compress, **{"finetune.steps": steps})
        for name, (compress, steps) in candidates().items()
    ]
    return dict(
        name="lossless_frontier",
        job="compress",
        workdir=str(study.ROOT / "runs" / "sweeps" / "lossless_frontier"),
        base=study.base(finetune_steps=FT),
        axes=[points],
        collect={
            "bits_per_byte": "final.bits_per_byte",
            "loss": "final.loss",
            "file_bytes": "packed.file_bytes",
            "ratio_vs_fp32": "packed.ratio_vs_fp32",
            "bits_per_weight": "packed.bits_per_weight",
        },
        plot=dict(x="ratio_vs_fp32", y="bits_per_byte", logx=True, title="size vs quality of every config"),
    )
