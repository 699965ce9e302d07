"""Quantization and weight-sharing study on the Tiny Shakespeare model: codebooks (per channel / tensor; k-means
one-shot, then 200 fine-tuning steps with trained centroids and, as the control, with the codebook held fixed),
RTN and GPTQ (per tensor / channel / group of 32, symmetric; one-shot), QAT and LSQ (per channel; one-shot grid and
after 200 steps) and GPTQ with 8-bit activations, at 2..8 bits on the block linear kernels. The fine-tuned rows
run at 2, 3, 4 and 8 bits only. 86 compress points, ~1 h on 2 idle CPU cores.

    ziplm sweep experiments/sweeps/quant_study.py [--jobs 2] [--only gptq]
    python experiments/quant_study.py     # the sweep, then experiments/results/quant_study.json and .png

Settings: experiments/sweeps/study.py (GPTQ: blocksize 128, 1% damping, no act-order, group scales fitted as the
sweep reaches them, the convention of the committed results).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.sweeps import study  # noqa: E402

BITS = (2, 3, 4, 5, 6, 7, 8)
FINETUNE_BITS = (2, 3, 4, 8)
GROUP_SIZE = 32  # divides d_model 128 and d_ff 512, the input dims of every block kernel
LSQ_LR = 1e-3  # Adam on log(scale): about 0.1% per step, so up to ~20% over the 200 fine-tuning steps
FT = 200


def _point(label: str, method: dict, steps: int = 0) -> dict:
    return {"label": label, "compress": [method], "finetune.steps": steps}


def points() -> list[dict]:
    """The study's rows as labelled points: "<method> <granularity> <bits>-bit[ + ft| + ft static]"."""
    out = []
    for g in ("channel", "tensor"):
        for b in BITS:
            cb = dict(method="codebook", bits=b, granularity=g, trained=True)
            if b in FINETUNE_BITS:
                out.append(_point(f"codebook {g} {b}-bit + ft", cb, FT))
                out.append(_point(f"codebook {g} {b}-bit + ft static", dict(cb, trained=False), FT))
            else:
                out.append(_point(f"codebook {g} {b}-bit", cb))
    for method in ("rtn", "gptq"):
        for g in ("tensor", "channel", "group"):
            for b in BITS:
                kw = dict(method=method, bits=b, granularity=g, group_size=GROUP_SIZE, symmetric=True)
                if method == "gptq":
                    kw["group_fit"] = "sweep"
                out.append(_point(f"{method} {g} {b}-bit", kw))
    for name, extra in (("qat", {}), ("lsq", dict(learn_scale=True, scale_lr=LSQ_LR))):
        for b in BITS:
            kw = dict(method="qat", bits=b, granularity="channel", symmetric=True, **extra)
            out.append(
                _point(
                    f"{name} channel {b}-bit" + (" + ft" if b in FINETUNE_BITS else ""), kw, FT * (b in FINETUNE_BITS)
                )
            )
    for b in BITS:
        gptq = dict(method="gptq", bits=b, granularity="channel", symmetric=True, group_fit="sweep")
        out.append({"label": f"gptq+a8 channel {b}-bit", "compress": [gptq, dict(method="act_quant", bits=8)]})
    return out


def get_config():
    return dict(
        name="quant_study",
        job="compress",
        workdir=str(study.ROOT / "runs" / "sweeps" / "quant_study"),
        base=study.base(finetune_steps=0),
        axes=[points()],
        extra=[{"label": "dense + ft", "compress": [dict(method="magnitude", sparsity=0.0)], "finetune.steps": FT}],
        collect={
            "oneshot_loss": "compressed.loss",
            "finetuned_loss": "finetuned.loss",
            "bits_per_weight": "packed.bits_per_weight",
        },
    )
