"""The lossless frontier: the largest compression ratio (packed file vs float32, every byte counted) whose
validation bits per byte stays within 1% of the dense model's, over the compression methods of the repository, on
the Tiny Shakespeare model.

    python experiments/lossless_frontier.py            # ~40 min on 2 CPU cores; points cached in runs/sweeps/
    python experiments/lossless_frontier.py --tolerance 0.005 --only "mixed"

Every candidate is one point of the sweep experiments/sweeps/lossless_frontier.py (`ziplm sweep` runs it; this
script runs it, then finds the frontier), a compress config on runs/shakespeare_char_cpu: pruning (magnitude,
SparseGPT; 30-70%, with 200 fine-tuning steps), GPTQ (3-8 bits, per channel and in groups of 32), codebooks (3-6
bits per tensor and per channel), vector codebooks (`vq`), QAT (2-4 bits, 200 steps), the staged combinations
(prune -> fine-tune -> GPTQ / codebooks), and the whole-model rows: QAT of the block kernels with the tied
embedding and the position table on per-row grids (`granularity="row"`) and the norms in bfloat16 (`cast`), and
`mixed` allocations (per leaf: QAT 2/3/4 bits for kernels, 3/4/6-bit rows for the tables, float8 / bfloat16 for the
norms) under a sweep of whole-file budgets in bits per weight. Each is packed (`model.zlm`), so the ratio is 4
bytes x parameters / file bytes, and evaluated on the whole validation split (non-overlapping windows of 64
characters; bits per byte = nats/char / ln 2).

Tolerance: bits per byte <= (1 + tolerance) x the reference. Two references are reported: the dense model, and
the dense model fine-tuned for the same 200 steps ("dense + ft", the fair control for fine-tuned rows, since they
start from a model that is still improving); the target of the issue is the latter. Writes
experiments/results/lossless_frontier.json (every row, the frontiers, the winners) and .png (every row coloured by
method family, the Pareto frontier, the two tolerance lines).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.sweeps import study  # noqa: E402
from experiments.sweeps.lossless_frontier import FT  # noqa: E402
from research import files  # noqa: E402

SWEEP = str(ROOT / "experiments" / "sweeps" / "lossless_frontier.py")


def family(name: str) -> str:
    for key in ("mixed", "vq", "qat", "codebook", "gptq", "sparsegpt", "magnitude", "dense"):
        if name.startswith(key):
            return key
    return "other"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tolerance", type=float, default=0.01)
    p.add_argument("--only", help="regular expression over the point names (default: all)")
    p.add_argument("--jobs", type=int, default=1, help="points run at once (child processes)")
    p.add_argument("--out", default=str(ROOT / "experiments/results/lossless_frontier.json"))
    args = p.parse_args(argv)
    t_start = time.time()
    status, finished = study.run_sweep(SWEEP, args.jobs, args.only)
    rows, dense = [], None
    for r in finished:
        s = r["result"]
        dense = s["dense"]
        final = s["finetuned"] or s["compressed"]
        rows.append(
            dict(
                name=r["label"],
                compress=r["overrides"]["compress"],
                finetune_steps=r["overrides"]["finetune.steps"],
                bits_per_byte=final["bits_per_byte"],
                loss=final["loss"],
                packed_bytes=s["packed"]["file_bytes"],
                ratio_vs_fp32=s["packed"]["ratio_vs_fp32"],
                ratio_vs_bf16=s["packed"]["ratio_vs_bf16"],
                bits_per_weight=s["packed"]["bits_per_weight"],
                family=family(r["label"]),
                workdir=s["workdir"],
                **({"allocation": _allocation(s["allocation"][0])} if s.get("allocation") else {}),
            )
        )
    limit = dense["bits_per_byte"] * (1 + args.tolerance)
    dense_ft = next((r for r in rows if r["name"] == "dense + ft"), None)
    limit_ft = dense_ft["bits_per_byte"] * (1 + args.tolerance) if dense_ft else None

    def best_within(bound):
        ok = [r for r in rows if bound is not None and r["bits_per_byte"] <= bound]
        return max(ok, key=lambda r: r["ratio_vs_fp32"]) if ok else None

    frontier = []
    for r in sorted(rows, key=lambda r: -r["ratio_vs_fp32"]):  # Pareto: no other row is both smaller and better
        if not frontier or r["bits_per_byte"] < frontier[-1]["bits_per_byte"]:
            frontier.append(r)
    best, best_ft = best_within(limit), best_within(limit_ft)
    result = dict(
        experiment="lossless frontier: largest packed compression ratio within tolerance of the dense bits per byte",
        command="python experiments/lossless_frontier.py (= ziplm sweep experiments/sweeps/lossless_frontier.py)",
        protocol="Tiny Shakespeare validation split, non-overlapping windows of 64 characters; ratio = 4 bytes x "
        "parameters / packed file bytes (model.zlm, every byte counted)",
        tolerance=args.tolerance,
        dense=dense,
        dense_finetuned=dense_ft,
        limit_bits_per_byte=limit,
        limit_vs_dense_finetuned=limit_ft,
        rows=rows,
        frontier=[r["name"] for r in frontier],
        best_within_tolerance=best,
        best_within_tolerance_of_dense_finetuned=best_ft,
        seconds=time.time() - t_start,
    )
    out = Path(args.out)
    files.write_json(out, result)
    plot(result, out.with_suffix(".png"))
    print(f"\ndense {dense['bits_per_byte']:.4f} bits/byte; limit {limit:.4f} ({args.tolerance:.1%})")
    for what, r in (("dense", best), ("dense + ft", best_ft)):
        if r:
            print(
                f"largest ratio within {args.tolerance:.1%} of {what}: {r['name']}: x{r['ratio_vs_fp32']:.2f} vs "
                f"fp32, {r['bits_per_byte']:.4f} bits/byte"
            )
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return status


def _allocation(a: dict) -> dict:
    """A mixed row's allocation, short: bytes and the option of every leaf."""
    return dict(
        budget_bytes=a["budget_bytes"],
        file_bytes=a.get("file_bytes"),
        leaves_per_option=a["leaves_per_option"],
        seconds=a["seconds"],
        leaves={r["leaf"]: [r["option"], r["bytes"]] for r in a["leaves"]},
    )


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    rows = result["rows"]
    front = set(result["frontier"])
    colors = {f: f"C{i}" for i, f in enumerate(sorted({r.get("family", "other") for r in rows}))}
    for f, c in colors.items():
        mine = [r for r in rows if r.get("family", "other") == f]
        ax.scatter(
            [r["ratio_vs_fp32"] for r in mine], [r["bits_per_byte"] for r in mine], color=c, s=18, label=f, zorder=3
        )
    picks = (result["best_within_tolerance"], result.get("best_within_tolerance_of_dense_finetuned"))
    for r in rows:
        on = r["name"] in front
        if on or any(p and r["name"] == p["name"] for p in picks):
            ax.annotate(
                r["name"],
                (r["ratio_vs_fp32"], r["bits_per_byte"]),
                fontsize=7,
                xytext=(4, 2),
                textcoords="offset points",
            )
    fr = sorted((r for r in rows if r["name"] in front), key=lambda r: r["ratio_vs_fp32"])
    ax.plot(
        [r["ratio_vs_fp32"] for r in fr], [r["bits_per_byte"] for r in fr], color="k", lw=1, label="Pareto frontier"
    )
    ax.axhline(result["dense"]["bits_per_byte"], color="k", ls="--", lw=1, label="dense")
    ax.axhline(result["limit_bits_per_byte"], color="gray", ls=":", lw=1, label=f"dense + {result['tolerance']:.0%}")
    if result.get("limit_vs_dense_finetuned"):
        ax.axhline(
            result["limit_vs_dense_finetuned"],
            color="C3",
            ls=":",
            lw=1,
            label=f"dense fine-tuned {FT} steps + {result['tolerance']:.0%}",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("compression ratio vs float32 (packed file, every byte counted)")
    ax.set_ylabel("validation bits per byte")
    ax.set_ylim(top=min(max(r["bits_per_byte"] for r in rows), result["dense"]["bits_per_byte"] * 1.15))
    ax.set_title("Tiny Shakespeare model: size vs quality of every compression config")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
