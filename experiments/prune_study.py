"""Pruning study on the Tiny Shakespeare model: sparsity 10-90% and 2:4 / 4:8 for magnitude, Wanda and SparseGPT,
each without and with fine-tuning (masks held). Validation loss in nats/char (= nats/byte: the file is ASCII).

    python experiments/prune_study.py                  # trains runs/shakespeare_char_cpu first if it is missing
    python experiments/prune_study.py --finetune-steps 0 --methods magnitude,wanda

Writes experiments/results/prune_study.json (every row, with the protocol and settings) and prune_study.png.
Calibration: 128 training windows of 64 characters (the model's context), seed 0. Fine-tuning: AdamW lr 3e-4 ->
3e-5, no weight decay, batch 12 x 64, the same batches for every row. Expected at 50% without fine-tuning (the
papers' ordering on large models): SparseGPT <= Wanda <= magnitude in validation loss. The JSON says what happened.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments import study  # noqa: E402
from research import files  # noqa: E402
from research.compress import registry  # noqa: E402
from research.compress.prune import masks as masks_lib  # noqa: E402

LEVELS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, "2:4", "4:8"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "runs/shakespeare_char_cpu"), help="trained run directory")
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    p.add_argument("--finetune-steps", type=int, default=200)
    p.add_argument("--out", default=str(ROOT / "experiments/results/prune_study.json"))
    args = p.parse_args(argv)
    st = study.setup(Path(args.model), args.finetune_steps)
    m, evaluate = st.m, st.evaluate
    dense = evaluate(m.params)
    rows = []
    dense_ft = st.dense_control()
    print(f"dense: {dense}; dense fine-tuned {args.finetune_steps} steps: {dense_ft}", flush=True)
    for method in args.methods.split(","):
        for level in LEVELS:
            kw = dict(pattern=level) if isinstance(level, str) else dict(sparsity=level)
            t = registry.make(method, **kw)
            t0 = time.time()
            state = t.init(m.params, jax.random.key(0), st.cal)
            effective = jax.block_until_ready(t.apply(m.params, state))
            seconds = time.time() - t0
            row = dict(method=method, level=level, sparsity=masks_lib.sparsity_of(t.masks(state))["total"])
            row.update(prune_seconds=seconds, oneshot=evaluate(effective))
            if args.finetune_steps:
                params, state, info = st.finetune(t, state)
                row.update(finetuned=evaluate(t.apply(params, state)), finetune_seconds=info["seconds"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(
        model=args.model,
        model_config=m.cfg.to_dict(),
        protocol=f"Tiny Shakespeare validation split, {st.protocol.describe()}, loss in nats/char",
        calibration="128 x 64 training windows, seed 0",
        finetune=dict(st.ft.to_dict()),
        dense=dense,
        dense_finetuned=dense_ft,
        rows=rows,
        devices=str(jax.devices()),
    )
    files.write_json(out, result)
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, stage in zip(axes, ("oneshot", "finetuned")):
        for method in dict.fromkeys(r["method"] for r in result["rows"]):
            rows = [r for r in result["rows"] if r["method"] == method and stage in r and isinstance(r["level"], float)]
            line = ax.plot([r["sparsity"] for r in rows], [r[stage]["loss"] for r in rows], "o-", label=method)[0]
            for r in (
                r for r in result["rows"] if r["method"] == method and stage in r and isinstance(r["level"], str)
            ):
                ax.plot(r["sparsity"], r[stage]["loss"], "s" if r["level"] == "2:4" else "^", color=line.get_color())
        ax.axhline(result["dense"]["loss"], color="k", ls="--", lw=1, label="dense")
        if stage == "finetuned" and result.get("dense_finetuned"):
            ax.axhline(result["dense_finetuned"]["loss"], color="gray", ls=":", lw=1, label="dense fine-tuned")
        ax.set_title({"oneshot": "one-shot", "finetuned": f"fine-tuned {result['finetune']['steps']} steps"}[stage])
        ax.set_xlabel("sparsity of the block linear weights (squares 2:4, triangles 4:8)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss (nats/char)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
