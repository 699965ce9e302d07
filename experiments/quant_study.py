"""Quantization and weight-sharing study on the Tiny Shakespeare model: 2..8 bits for codebooks (one-shot k-means,
then trained centroids), RTN and GPTQ (one-shot, tensor / channel / group-of-32 symmetric grids) and QAT (channel),
each row with its effective bits per weight counted from the transform's state. Loss in nats/char (= nats/byte).

    python experiments/quant_study.py                  # trains runs/shakespeare_char_cpu first if it is missing
    python experiments/quant_study.py --bits 2,3,4,8 --methods rtn,gptq --finetune-steps 0

Writes experiments/results/quant_study.json (every row, with the protocol and settings) and quant_study.png.
Quantized leaves: the linear kernels inside the blocks (`core.BLOCK_KERNELS`); embeddings, norms and biases stay
float32 and are not counted in the bits per weight.

Rows (protocol as in prune_study.py: validation split, windows of the model's context, stride = context):
- codebook/<granularity>: weighted k-means (linear init, Lloyd until no centroid moves, at most 300 iterations),
  2**bits centroids per output channel ("channel") or per tensor ("tensor"). "oneshot" is the k-means codebook as
  fitted; "finetuned" is after fine-tuning with trained=True (centroids trained by SGD, lr 1e-4, on the summed
  gradients of their weights, indices fixed; Deep Compression); "finetuned_static" is the control: the same
  fine-tuning with the codebook held fixed (trained=False), so only the unshared parameters (embeddings, norms,
  biases) move. The gap between the two is what training the centroids adds.
- rtn/<granularity>, gptq/<granularity>: one-shot only (RTN's apply passes no gradient; fine-tune with QAT).
  GPTQ: calibration 128 training windows of 64 characters, seed 0 (as prune_study), blocksize 128, 1% damping,
  no act-order.
- qat/channel: "oneshot" is the fake-quantized dense model (the same grid as RTN channel); "finetuned" is after
  QAT fine-tuning, evaluated with its fake-quantized effective weights (scales refitted after every step).
- lsq/channel: QAT with learned step sizes (`qat(learn_scale=True)`, Adam on log(scale), lr 1e-3), starting from
  the min/max scales; "finetuned" as for QAT.
- gptq+a8/channel: GPTQ channel weights and the input of every block linear layer fake-quantized per token to 8
  bits (W{bits}A8, `models.act_quant`); one-shot. The bits per weight are GPTQ's (activations store nothing).
Fine-tuning (codebook, QAT, LSQ and the dense control row): AdamW lr 3e-4 -> 3e-5, no weight decay, batch 12 x 64,
200 steps, the same batches for every row (prune_study's settings). To keep the run under ~30 minutes on 2 shared
CPU cores, the fine-tuned rows (codebooks, QAT, LSQ) are run at 2, 3, 4 and 8 bits only (--finetune-bits); the
one-shot rows cover every bit width 2..8.

Effective bits per weight = (bits x number of codes or indices + 32 x float32 scales or codebook entries + 8 x uint8
zero points) / number of quantized weights, from the sizes of the state's leaves (`state_bits`). Symmetric grids
still store their (constant) zero points, so they are counted. QAT stores no codes: its codes are counted as one
per quantized weight (what export would store). Codebook "keep" masks are all True here (no pruning), so they
are not counted. Expected (the issue): GPTQ <= RTN at 3-4 bits; trained centroids <= untrained. The JSON says
what happened.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments import study  # noqa: E402
from research import files, models  # noqa: E402
from research.compress import core, registry  # noqa: E402

GROUP_SIZE = 32  # divides d_model 128 and d_ff 512, the input dims of every block kernel
LSQ_LR = 1e-3  # Adam on log(scale): about 0.1% per step, so up to ~20% over the 200 fine-tuning steps


def _sizes(tree_) -> dict:
    return {p: int(np.size(a)) for p, a in core.touched(tree_).items()}


def state_bits(method: str, bits: int, state, params) -> dict:
    """Storage of the quantized leaves, from the sizes of the state's arrays.

    Returns:
      {"weights": number of quantized weights, "bits": total bits, "bits_per_weight", "breakdown"}.
    """
    if method == "codebook":
        codes = _sizes(state["indices"])
        extra = {"codebook_f32": (_sizes(state["codebook"]), 32)}
    else:
        if method == "qat":  # no codes in the state: one code per weight of each quantized leaf
            flat = core.touched(params)
            codes = {p: int(np.size(flat[p])) for p in core.touched(state["scale"])}
        else:
            codes = _sizes(state["codes"])
        extra = {"scale_f32": (_sizes(state["scale"]), 32), "zero_u8": (_sizes(state["zero"]), 8)}
    n = sum(codes.values())
    breakdown = {"codes": bits * n} | {k: w * sum(s.values()) for k, (s, w) in extra.items()}
    total = sum(breakdown.values())
    return dict(weights=n, bits=total, bits_per_weight=total / n, breakdown=breakdown)


def formula_bits(method: str, bits: int, granularity: str, shapes: list) -> float:
    """The same number from the shapes alone, as a cross-check of `state_bits` (kernels (in, out), N weights):
    rtn/gptq/qat: bits + 40 * n_scales / N with n_scales = L (tensor), sum(out) (channel), sum(in * out) / g
    (group), 40 = 32-bit scale + 8-bit zero point; codebook: bits + 32 * 2**bits * n_books / N with n_books = L
    (tensor) or sum(out) (channel). E.g. rtn channel on a 128 -> 128 kernel: bits + 40 / 128 = bits + 0.31;
    group 32: bits + 40 / 32 = bits + 1.25; codebook channel at 8 bits on in = 128: 8 + 32 * 256 / 128 = 72.
    """
    n = sum(i * o for i, o in shapes)
    groups = {"tensor": len(shapes), "channel": sum(o for _, o in shapes)}
    groups["group"] = n // GROUP_SIZE
    per = 32 * 2**bits if method == "codebook" else 40
    return bits + per * groups[granularity] / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "runs/shakespeare_char_cpu"), help="trained run directory")
    p.add_argument("--methods", default="codebook,rtn,gptq,qat,lsq,gptq+a8")
    p.add_argument("--bits", default="2,3,4,5,6,7,8")
    p.add_argument("--codebook-granularities", default="channel,tensor")
    p.add_argument("--grid-granularities", default="tensor,channel,group", help="for rtn and gptq")
    p.add_argument("--finetune-steps", type=int, default=200)
    p.add_argument("--finetune-bits", default="2,3,4,8", help="bit widths that also get the fine-tuned rows")
    p.add_argument("--out", default=str(ROOT / "experiments/results/quant_study.json"))
    args = p.parse_args(argv)
    bits_list = [int(b) for b in args.bits.split(",")]
    ft_bits = {int(b) for b in args.finetune_bits.split(",")}
    t_start = time.time()
    st = study.setup(Path(args.model), args.finetune_steps)
    m, evaluate, cal, protocol, ft = st.m, st.evaluate, st.cal, st.protocol, st.ft
    flat = core.touched(m.params)
    shapes = [tuple(flat[p].shape) for p in core.select(m.params, core.BLOCK_KERNELS)]
    dense = evaluate(m.params)
    dense_ft = st.dense_control()
    print(f"dense: {dense}; dense fine-tuned {args.finetune_steps} steps: {dense_ft}", flush=True)

    # (label, registry method, granularity, kwargs, fine-tune?, activation bits)
    plan = []
    for method in args.methods.split(","):
        if method == "codebook":
            for g in args.codebook_granularities.split(","):
                plan.append((method, method, g, dict(granularity=g, trained=True), True, None))
        elif method in ("rtn", "gptq"):
            for g in args.grid_granularities.split(","):
                kw = dict(granularity=g, group_size=GROUP_SIZE, symmetric=True)
                if method == "gptq":
                    kw["group_fit"] = "sweep"  # the convention the committed results used (see gptq's docstring)
                plan.append((method, method, g, kw, False, None))
        elif method == "qat":
            plan.append((method, method, "channel", dict(granularity="channel", symmetric=True), True, None))
        elif method == "lsq":
            kw = dict(granularity="channel", symmetric=True, learn_scale=True, scale_lr=LSQ_LR)
            plan.append((method, "qat", "channel", kw, True, None))
        elif method == "gptq+a8":
            kw = dict(granularity="channel", symmetric=True, group_fit="sweep")
            plan.append((method, "gptq", "channel", kw, False, 8))
        else:
            raise SystemExit(f"unknown method {method!r} (codebook, rtn, gptq, qat, lsq, gptq+a8)")
    act_graph = models.abstract(m.cfg.replace(act_bits=8))[0]

    n_quant = sum(a * b for a, b in shapes)

    def result(rows, partial):
        return dict(
            model=args.model,
            model_config=m.cfg.to_dict(),
            protocol=f"Tiny Shakespeare validation split, {protocol.describe()}, loss in nats/char",
            quantized=f"block linear kernels ({core.BLOCK_KERNELS}), {len(shapes)} leaves, {n_quant} weights; "
            "bits_per_weight counts codes/indices at their bit width, float32 scales and codebook entries, "
            "uint8 zero points, from the state's array sizes",
            calibration="128 x 64 training windows, seed 0 (gptq)",
            settings=dict(
                group_size=GROUP_SIZE,
                symmetric=True,
                codebook=dict(init="linear", iters=300, lr=1e-4, trained_in_finetune=True),
                lsq=dict(scale_lr=LSQ_LR, optimizer="adam on log(scale)"),
                gptq_a8="gptq channel weights, inputs of every block linear fake-quantized per token to 8 bits",
                gptq=dict(blocksize=128, percdamp=0.01, act_order=False),
            ),
            finetune=dict(ft.to_dict()),
            finetune_bits=sorted(ft_bits),
            dense=dense,
            dense_finetuned=dense_ft,
            rows=rows,
            partial=partial,
            seconds=time.time() - t_start,
            devices=str(jax.devices()),
        )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, method, gran, kw, tune, a_bits in plan:
        graphdef = m.graphdef if a_bits is None else act_graph
        for bits in bits_list:
            t = registry.make(method, bits=bits, **kw)
            t0 = time.time()
            state = t.init(
                m.params, jax.random.key(0), cal if registry.needs_calibration(dict(method=method)) else None
            )
            effective = jax.block_until_ready(t.apply(m.params, state))
            seconds = time.time() - t0
            size = state_bits(method, bits, state, m.params)
            expected = formula_bits(method, bits, gran, shapes)
            assert abs(size["bits_per_weight"] - expected) < 1e-9, (method, gran, bits, size, expected)
            row = dict(method=label, granularity=gran, bits=bits, bits_per_weight=size["bits_per_weight"])
            row.update(size=size, init_seconds=seconds, oneshot=evaluate(effective, graphdef))
            if a_bits is not None:
                row["act_bits"] = a_bits
            if tune and args.finetune_steps and bits in ft_bits:
                params, st_, info = st.finetune(t, state, graphdef)
                row.update(finetuned=evaluate(t.apply(params, st_), graphdef), finetune_seconds=info["seconds"])
                if method == "codebook":  # the control: the same fine-tuning with the codebook held fixed
                    static = registry.make(method, bits=bits, **{**kw, "trained": False})
                    params, st_, _ = st.finetune(static, state, graphdef)
                    row["finetuned_static"] = evaluate(static.apply(params, st_), graphdef)
            rows.append(row)
            brief = {k: v for k, v in row.items() if k != "size"}
            print(json.dumps(brief), flush=True)
            files.write_json(out, result(rows, partial=True))
    final = result(rows, partial=False)
    files.write_json(out, final)
    plot(final, out.with_suffix(".png"))
    table(final)
    print(f"wrote {out} and {out.with_suffix('.png')} in {final['seconds']:.0f} s")
    return 0


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
