"""Quantization and weight-sharing study on the Tiny Shakespeare model: the sweep experiments/sweeps/quant_study.py
(codebooks one-shot, trained and static; RTN and GPTQ per tensor / channel / group of 32; QAT and LSQ; GPTQ with
8-bit activations; 2..8 bits on the block linear kernels), then its rows as experiments/results/quant_study.json and
the plot. Loss in nats/char (= nats/byte).

    python experiments/quant_study.py              # trains runs/shakespeare_char_cpu first if it is missing
    python experiments/quant_study.py --jobs 2

Rows: "oneshot" is the compressed model before fine-tuning (k-means codebooks as fitted, the fake-quantized grid for
QAT / LSQ); "finetuned" after 200 steps (codebooks with trained centroids; QAT / LSQ with their grids held);
"finetuned_static" the codebook control (fine-tuned with the codebook fixed, so only the unshared parameters move).
Bits per weight = the packed bytes of the quantized leaves (codes, scales, zero points, codebooks; entropy-coded,
every byte counted: `summary["packed"]["kinds"]`) x 8 / their number of weights. (Before the sweep, this study
counted the state's arrays at their nominal widths; the packed file is what a user stores.) Finished points are
cached under runs/sweeps/quant_study/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.sweeps import quant_study as sweep_cfg  # noqa: E402
from experiments.sweeps import study  # noqa: E402
from research import config as config_lib  # noqa: E402
from research import files, sources  # noqa: E402

SWEEP = str(ROOT / "experiments" / "sweeps" / "quant_study.py")
METRICS = ("loss", "bits_per_byte", "accuracy")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=1, help="points run at once (child processes)")
    p.add_argument("--only", help="regular expression over the point names (default: all)")
    p.add_argument("--out", default=str(ROOT / "experiments/results/quant_study.json"))
    args = p.parse_args(argv)
    status, finished = study.run_sweep(SWEEP, args.jobs, args.only)
    result = analyse(finished)
    out = Path(args.out)
    files.write_json(out, result)
    plot(result, out.with_suffix(".png"))
    table(result)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return status


def quantized_bits(summary: dict) -> tuple[int, float]:
    """(number of quantized weights, packed bits per quantized weight) from the packed file's kinds."""
    kinds = {k: v for k, v in summary["packed"]["kinds"].items() if k != "float"}
    n = sum(v["values"] for v in kinds.values())
    return n, 8 * sum(v["bytes"] for v in kinds.values()) / max(n, 1)


def analyse(points: list[dict]) -> dict:
    rows, control, first = {}, None, None
    for r in points:
        s, label = r["result"], r["label"]
        first = first or s
        if label == "dense + ft":
            control = {k: s["finetuned"][k] for k in METRICS}
            continue
        name, gran, bits = label.split(" + ")[0].split(" ")
        key = (name, gran, int(bits.removesuffix("-bit")))
        row = rows.setdefault(key, dict(method=name, granularity=gran, bits=key[2]))
        if label.endswith("static"):
            row["finetuned_static"] = {k: s["finetuned"][k] for k in METRICS}
            continue
        n, bpw = quantized_bits(s)
        row.update(weights=n, bits_per_weight=bpw, init_seconds=s["seconds"]["compress"])
        row["oneshot"] = {k: s["compressed"][k] for k in METRICS}
        if s.get("finetuned"):
            row.update(finetuned={k: s["finetuned"][k] for k in METRICS}, finetune_seconds=s["finetune"]["seconds"])
        if s.get("act_bits"):
            row["act_bits"] = s["act_bits"]
    cfg = config_lib.load(SWEEP)
    n_weights = next(r["weights"] for r in rows.values() if "weights" in r)
    return dict(
        command="python experiments/quant_study.py (= ziplm sweep experiments/sweeps/quant_study.py)",
        model=first["source"],
        model_config=sources.load(first["source"]).cfg.to_dict(),
        protocol=f"Tiny Shakespeare validation split, {first['dense']['protocol']}, loss in nats/char",
        quantized=f"block linear kernels, {n_weights} weights; bits_per_weight = packed bytes of the quantized leaves "
        "(codes, scales, zero points, codebooks; entropy-coded) x 8 / their number of weights",
        calibration=f"{cfg.base.calibration.n} x {cfg.base.calibration.length} training windows, seed 0 (gptq)",
        settings=dict(
            group_size=sweep_cfg.GROUP_SIZE,
            symmetric=True,
            lsq=dict(scale_lr=sweep_cfg.LSQ_LR, optimizer="adam on log(scale)"),
            gptq_a8="gptq channel weights, inputs of every block linear fake-quantized per token to 8 bits",
            gptq=dict(blocksize=128, percdamp=0.01, act_order=False, group_fit="sweep"),
        ),
        finetune=dict(cfg.base.finetune.to_dict(), steps=sweep_cfg.FT),
        finetune_bits=list(sweep_cfg.FINETUNE_BITS),
        dense={k: first["dense"][k] for k in METRICS},
        dense_finetuned=control,
        rows=list(rows.values()),
        devices=str(first["devices"]),
    )


def table(result: dict) -> None:
    d, dft = result["dense"]["loss"], result["dense_finetuned"]
    print(f"dense {d:.4f}" + (f", dense fine-tuned {dft['loss']:.4f}" if dft else "") + " (nats/char)")
    print(f"{'method':<10} {'gran':<8} {'bits':>4} {'bits/w':>7} {'oneshot':>8} {'finetuned':>9} {'static':>8}")
    for r in result["rows"]:
        ftl = f"{r['finetuned']['loss']:9.4f}" if "finetuned" in r else f"{'-':>9}"
        stl = f"{r['finetuned_static']['loss']:8.4f}" if "finetuned_static" in r else f"{'-':>8}"
        print(
            f"{r['method']:<10} {r['granularity']:<8} {r['bits']:>4} {r['bits_per_weight']:7.3f} "
            f"{r['oneshot']['loss']:8.4f} {ftl} {stl}"
        )


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(10, 6))
    colors = {"codebook": "C0", "rtn": "C1", "gptq": "C2", "qat": "C3", "lsq": "C4", "gptq+a8": "C5"}
    styles = {"tensor": ":", "channel": "-", "group": "-."}
    series = dict.fromkeys((r["method"], r["granularity"]) for r in result["rows"])
    for method, gran in series:
        rows = sorted(
            (r for r in result["rows"] if (r["method"], r["granularity"]) == (method, gran)),
            key=lambda r: r["bits_per_weight"],
        )
        stages = [("finetuned", "fine-tuned", "s")] if method in ("qat", "lsq") else [("oneshot", "one-shot", "o")]
        if method == "codebook":
            stages = [
                ("oneshot", "untrained", "o"),
                ("finetuned_static", "static + FT", "^"),
                ("finetuned", "trained", "s"),
            ]
        for stage, label, marker in stages:
            xs = [(r["bits_per_weight"], r[stage]["loss"]) for r in rows if stage in r]
            if xs:
                kw = dict(mfc="none") if method == "codebook" and stage == "oneshot" else {}
                ax.plot(
                    *zip(*xs),
                    marker,
                    ls=styles[gran],
                    color=colors.get(method),
                    ms=5,
                    label=f"{method} {gran} {label}",
                    **kw,
                )
    ax.axhline(result["dense"]["loss"], color="k", ls="--", lw=1, label="dense (32 bits)")
    if result.get("dense_finetuned"):
        ax.axhline(result["dense_finetuned"]["loss"], color="gray", ls=":", lw=1, label="dense fine-tuned")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("effective bits per quantized weight (codes + scales / codebooks + zero points)")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title("Tiny Shakespeare char model: quantization and weight sharing of the block kernels")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
