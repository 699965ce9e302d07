"""Pruning study on the Tiny Shakespeare model: the sweep experiments/sweeps/prune_study.py (magnitude, Wanda and
SparseGPT at 10-90% and 2:4 / 4:8, one-shot and fine-tuned 200 steps with the masks held, and the dense control),
then its table as experiments/results/prune_study.json and its plot. Validation loss in nats/char (= nats/byte: the
file is ASCII).

    python experiments/prune_study.py                # trains runs/shakespeare_char_cpu first if it is missing
    python experiments/prune_study.py --jobs 2       # points in two processes

Finished points are cached under runs/sweeps/prune_study/ (a rerun only writes the files). Settings:
experiments/sweeps/study.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.sweeps import study  # noqa: E402
from research import config as config_lib  # noqa: E402
from research import files, sources  # noqa: E402

SWEEP = str(ROOT / "experiments" / "sweeps" / "prune_study.py")
METRICS = ("loss", "bits_per_byte", "accuracy")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=1, help="points run at once (child processes)")
    p.add_argument("--only", help="regular expression over the point names (default: all)")
    p.add_argument("--out", default=str(ROOT / "experiments/results/prune_study.json"))
    args = p.parse_args(argv)
    status, finished = study.run_sweep(SWEEP, args.jobs, args.only)
    result = analyse(finished)
    out = Path(args.out)
    files.write_json(out, result)
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return status


def analyse(rows: list[dict]) -> dict:
    """The sweep's finished points as the study's result: protocol, dense, control and one row per point."""
    control = next((r["result"] for r in rows if r["point"] == "dense-+-ft"), None)
    first = rows[0]["result"]
    m = sources.load(first["source"])
    out_rows = []
    for r in rows:
        if r["point"] == "dense-+-ft":
            continue
        s = r["result"]
        level = r["label"] if r["label"].endswith(("2:4", "4:8")) else float(r["label"].rstrip("%")) / 100
        out_rows.append(
            dict(
                method=r["method"],
                level=level,
                sparsity=s["sparsity"],
                prune_seconds=s["seconds"]["compress"],
                oneshot={k: s["compressed"][k] for k in METRICS},
                finetuned={k: s["finetuned"][k] for k in METRICS},
                finetune_seconds=s["finetune"]["seconds"],
            )
        )
    cfg = config_lib.load(SWEEP)
    ft = cfg.base.finetune
    return dict(
        command="python experiments/prune_study.py (= ziplm sweep experiments/sweeps/prune_study.py)",
        model=first["source"],
        model_config=m.cfg.to_dict(),
        protocol=f"Tiny Shakespeare validation split, {first['dense']['protocol']}, loss in nats/char",
        calibration=f"{cfg.base.calibration.n} x {cfg.base.calibration.length} training windows, seed "
        f"{cfg.base.calibration.seed}",
        finetune=dict(steps=ft.steps, lr=ft.lr, min_lr=ft.min_lr, warmup_steps=ft.warmup_steps, grad_clip=ft.grad_clip),
        dense={k: first["dense"][k] for k in METRICS},
        dense_finetuned={k: control["finetuned"][k] for k in METRICS} if control else None,
        rows=out_rows,
        devices=str(first["devices"]),
    )


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, stage in zip(axes, ("oneshot", "finetuned")):
        for method in dict.fromkeys(r["method"] for r in result["rows"]):
            rows = [r for r in result["rows"] if r["method"] == method and isinstance(r["level"], float)]
            line = ax.plot([r["sparsity"] for r in rows], [r[stage]["loss"] for r in rows], "o-", label=method)[0]
            for r in (r for r in result["rows"] if r["method"] == method and isinstance(r["level"], str)):
                ax.plot(r["sparsity"], r[stage]["loss"], "s" if r["level"] == "2:4" else "^", color=line.get_color())
        ax.axhline(result["dense"]["loss"], color="k", ls="--", lw=1, label="dense")
        if stage == "finetuned" and result["dense_finetuned"]:
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
