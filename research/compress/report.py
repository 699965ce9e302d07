"""What a compressed state amounts to: per-leaf and global sparsity, parameter counts, bytes dense vs effective.

"Effective bytes" here is a simple, stated estimate, not a file size: float32 values of the non-zero weights plus a
1-bit mask over every masked leaf (the packed format of `research.coding` measures real bytes). Dense bytes count
every parameter at float32 and at bfloat16.
"""

from __future__ import annotations

import numpy as np

from research import report as report_lib
from research import tree
from research.compress import core


def summarize(effective, masks=None) -> dict:
    """Counts of a compressed model.

    Args:
      effective: the effective parameter tree (what the model runs with).
      masks: the transform's mask tree (None leaves where unmasked), or None.

    Returns:
      {"leaves": [{path, shape, params, nonzero, sparsity, masked}], "params", "nonzero", "sparsity" (of all
      parameters, counting zero values), "masked_params", "masked_sparsity" (the fraction the masks remove),
      "dense_bytes_fp32", "dense_bytes_bf16"}. Stored sizes are the packed file's (`coding.pack`), every byte
      counted, not an estimate from these counts.
    """
    masked = core.touched(masks) if masks is not None else {}
    leaves = []
    for path, w in tree.flatten(effective).items():
        w = np.asarray(w)
        nz = int(np.count_nonzero(w))
        leaves.append(
            dict(
                path=path,
                shape=list(w.shape),
                params=int(w.size),
                nonzero=nz,
                sparsity=1.0 - nz / w.size if w.size else 0.0,
                masked=path in masked,
            )
        )
    n = sum(x["params"] for x in leaves)
    nz = sum(x["nonzero"] for x in leaves)
    mn = sum(x["params"] for x in leaves if x["masked"])
    mnz = sum(int(np.count_nonzero(np.asarray(m))) for m in masked.values())  # kept by the masks (zeros or not)
    return dict(
        leaves=leaves,
        params=n,
        nonzero=nz,
        sparsity=1.0 - nz / n if n else 0.0,
        masked_params=mn,
        masked_sparsity=1.0 - mnz / mn if mn else 0.0,
        dense_bytes_fp32=4 * n,
        dense_bytes_bf16=2 * n,
    )


def table(summary: dict, all_leaves: bool = False) -> str:
    """A `summarize` result (or a `compress` summary) as a text table: masked leaves (or all), then the totals.

    Per-leaf sparsity counts zero values; the masked total is the fraction the masks remove.
    """
    rows = [
        [x["path"], "x".join(map(str, x["shape"])), x["params"], x["nonzero"], x["sparsity"]]
        for x in summary["leaves"]
        if all_leaves or x["masked"]
    ]
    overall = summary.get("sparsity_all_params", summary["sparsity"])  # a compress summary, or `summarize`'s
    rows.append(["all parameters", "", summary["params"], summary["nonzero"], overall])
    text = report_lib.table(["leaf", "shape", "params", "non-zero", "sparsity"], rows)
    masked = summary.get("masked_sparsity", summary["sparsity"])
    packed = (summary.get("packed") or {}).get("file_bytes")
    stored = f", {packed:,} packed (every byte of model.zlm)" if packed else ""
    return (
        f"{text}\nmasked leaves: sparsity {masked:.4f} over {summary['masked_params']:,} weights; bytes: "
        f"{summary['dense_bytes_fp32']:,} dense fp32{stored}"
    )


def stages_table(summary: dict) -> str:
    """Validation metrics of the dense, compressed and fine-tuned model of a `compress` summary."""
    rows = []
    agreement = "kl" in (summary.get("compressed") or {})
    for stage in ("dense", "compressed", "finetuned", "shrunk"):
        r = summary.get(stage)
        if r:
            sparsity = {"dense": 0.0, "compressed": summary["sparsity_compressed"]}.get(stage, summary["sparsity"])
            counts = {"dense": summary["params"], "compressed": summary.get("nonzero_compressed")}
            n = r.get("params", counts.get(stage, summary["nonzero"]))
            row = [stage, sparsity, n, r["loss"], r["bits_per_byte"], r["perplexity"], r["accuracy"]]
            rows.append(row + ([r.get("kl", "-"), r.get("top1_agreement", "-")] if agreement else []))
    headers = ["model", "sparsity", "params", "loss", "bits/byte", "perplexity", "accuracy"]
    text = report_lib.table(headers + (["KL vs dense", "top-1 agree"] if agreement else []), rows)
    methods = " -> ".join(m.get("method") or f"finetune {m['finetune']}" for m in summary["methods"])
    protocol = summary["compressed"]["protocol"]
    return (
        f"{text}\nmethods: {methods}; protocol: {protocol}; sparsity over the masked leaves; params: non-zero "
        "parameters (all parameters of the shrunk model)"
    )
