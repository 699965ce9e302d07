"""Quantization cost: GPTQ time per layer and in total, and the fake-quant (QAT) training step vs the dense step.

Usage:
    python benchmarks/quant_cost.py                                  # trained study model if runs/ has it
    python benchmarks/quant_cost.py --model runs/shakespeare_char_cpu --parts gptq
    python benchmarks/quant_cost.py --parts qat --steps 10 --rounds 3

(a) GPTQ, 4 bits symmetric, per channel and in groups of 32, on the Tiny Shakespeare study shape (4 layers,
d_model 128, context 64; weights from `--model` via `research.sources.load`, by default runs/shakespeare_char_cpu
when present, else random init) and on the same shape at d_model 512 (random init). Calibration: `--n` x
`--length` tokens (`calib.sample` of Tiny Shakespeare bytes from ../shared/data when present, else random).
  - walk: `calib.walk` with the Hessian statistic and a visit that changes nothing (the forward passes alone);
  - layers: `gptq.quantize_layer` on each kernel's Hessian from the dense model, and their sum (run first, so a
    kernel shape's compilation shows in the first layer of that shape);
  - init: `gptq(...).init`, the whole method (walk + every kernel's GPTQ), the total.
Every timing is taken twice: `first_s` includes compilation, `s` is a second call with everything compiled;
compile_s = first_s - s.
(b) QAT step: `make_train_step` with `transform=qat(4, granularity="channel")` vs the dense step on the same model,
batch and AdamW, alternating in `--rounds` rounds so that machine noise hits both; the ratio is of the medians over
all timed steps (each synchronised, after one compiling call). Target: at most 1.2x.

OPENBLAS_NUM_THREADS is set to 1 (unless already set in the environment) before numpy and jax load: on small
shared CPUs OpenBLAS threads spin against XLA's and the Cholesky factorisations run far slower (see
prune_layerwise.py). Writes `benchmarks/results/quant_cost_<device>.json`; on CPU compare numbers within the file.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy / jax load OpenBLAS

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections as mlc  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402

from research import models, sources  # noqa: E402
from research.compress import calib, core  # noqa: E402
from research.compress.quant import gptq, qat  # noqa: E402
from research.compress.quant import grid as qgrid  # noqa: E402
from research.data import tokenizers  # noqa: E402
from research.models import config as mc  # noqa: E402
from research.train import optim  # noqa: E402
from research.train import step as step_lib  # noqa: E402

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
DEFAULT_RUN = ROOT / "runs" / "shakespeare_char_cpu"
GPTQ_SIZES = {
    "shakespeare": dict(vocab_size=256, n_layer=4, n_head=4, d_model=128, max_seq_len=64, bias=False),
    "d512": dict(vocab_size=256, n_layer=4, n_head=4, d_model=512, max_seq_len=64, bias=False),
}
GRIDS = {"channel": dict(granularity="channel"), "group32": dict(granularity="group", group_size=32)}
QAT_SIZES = {  # (model, batch, seq_len)
    "demo": (dict(vocab_size=256, n_layer=4, n_head=4, d_model=128, max_seq_len=128, bias=False), 16, 128),
    "6x384": (dict(vocab_size=256, n_layer=6, n_head=6, d_model=384, max_seq_len=256, bias=False), 8, 256),
}
TRAIN = dict(steps=1000, lr=1e-4, min_lr=1e-5, warmup_steps=0, weight_decay=0.1, b1=0.9, b2=0.99, grad_clip=1.0)


def twice(fn) -> dict:
    """{"first_s", "s", "compile_s"} of two synchronised calls."""
    times = []
    for _ in range(2):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return {"first_s": times[0], "s": times[1], "compile_s": max(times[0] - times[1], 0.0)}


def gptq_setup(size: str, model_dir: str | None, n: int, length: int):
    spec, weights = "byte", "random init"
    if model_dir and size == "shakespeare":
        m = sources.load(model_dir)
        cfg, graphdef, params, spec, weights = m.cfg, m.graphdef, m.params, m.tokenizer or "byte", model_dir
    else:
        cfg = mc.gpt2_style(**GPTQ_SIZES[size])
        graphdef, params = models.init(cfg)
    if SHAKESPEARE.is_file():
        tokens, source = tokenizers.load(spec).encode(SHAKESPEARE.read_text()), f"tinyshakespeare ({spec} tokens)"
    else:
        tokens, source = np.random.default_rng(0).integers(0, cfg.vocab_size, 200_000), "random tokens"
    inputs = calib.sample(tokens, n, length, seed=0, max_len=cfg.max_seq_len)
    return cfg, params, calib.Calibration(graphdef, inputs), source, weights


def gptq_case(size: str, model_dir: str | None, n: int, length: int) -> dict:
    cfg, params, c, source, weights = gptq_setup(size, model_dir, n, length)
    paths = core.select(params, core.BLOCK_KERNELS)
    walk = twice(lambda: calib.walk(c, params, paths, lambda *a: a[3], stat="hessian", progress=False))
    stats = {}

    def record(i, s, n_tokens, kernels):
        stats.update({f"layers/{i}/{name}/kernel": s[name] for name in kernels})
        return kernels

    calib.walk(c, params, paths, record, stat="hessian", progress=False)
    flat = core.touched(params)
    out = {
        "model": cfg.to_dict(),
        "weights": weights,
        "calibration": {"windows": n, "length": int(c.inputs.shape[1]), "tokens": int(c.inputs.size), "source": source},
        "walk": walk,
        "grids": {},
    }
    for gname, gkw in GRIDS.items():
        grid = qgrid.Grid(4, True, **gkw)
        layers = {}
        for p in paths:  # before init, so that each kernel shape's compilation shows in its first layer
            r = twice(lambda p=p, grid=grid: gptq.quantize_layer(flat[p], stats[p], grid, name=p))
            layers[p] = {"shape": list(flat[p].shape), **r}
        t = gptq.gptq(4, **gkw)
        init = twice(lambda t=t: t.init(params, jax.random.key(0), c))
        total = {k: sum(v[k] for v in layers.values()) for k in ("first_s", "s", "compile_s")}
        out["grids"][gname] = {
            "bits": 4,
            "symmetric": True,
            **gkw,
            "init": init,
            "init_over_walk": init["s"] / walk["s"],
            "layers": layers,
            "layers_total": total,
        }
        print(
            f"gptq {size:12s} {gname:8s} walk {walk['s']:6.2f}s  init {init['s']:6.2f}s (first {init['first_s']:6.2f}s)"
            f"  layers {total['s']:6.2f}s (first {total['first_s']:6.2f}s)",
            flush=True,
        )
    return out


def qat_case(name: str, steps: int, rounds: int) -> dict:
    kw, b, t = QAT_SIZES[name]
    cfg = mc.gpt2_style(**kw)
    graphdef, params = models.init(cfg)
    batch = {"inputs": jax.random.randint(jax.random.key(1), (b, t), 0, cfg.vocab_size)}
    batch["targets"] = jnp.roll(batch["inputs"], -1, axis=1)
    tx = optim.make(mlc.ConfigDict(TRAIN))
    transform = qat.qat(4, granularity="channel")
    cstate = transform.init(params, jax.random.key(0), None)
    dense_step = step_lib.make_train_step(graphdef, tx, seed=0, dropout=False)
    qat_step = step_lib.make_train_step(graphdef, tx, seed=0, dropout=False, transform=transform)
    dense, fq = [], []
    for _ in range(rounds):
        state = step_lib.init_state(jax.tree.map(jnp.copy, params), tx)
        dense += common.timed_steps(dense_step, state, batch, steps)
        state = {**step_lib.init_state(jax.tree.map(jnp.copy, params), tx), "compress": jax.tree.map(jnp.copy, cstate)}
        fq += common.timed_steps(qat_step, state, batch, steps)
    d, q = statistics.median(dense), statistics.median(fq)
    print(f"qat {name}: dense {d * 1e3:.1f} ms, qat {q * 1e3:.1f} ms, ratio {q / d:.3f}", flush=True)
    return dict(
        size=name,
        model=kw,
        batch=b,
        seq_len=t,
        params=mc.count_params(cfg),
        transform="qat(4, symmetric, granularity='channel') on the block kernels",
        dense_step_s=d,
        qat_step_s=q,
        ratio=q / d,
        target_ratio=1.2,
        target_met=q / d <= 1.2,
        timed_steps_each=len(dense),
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="run directory for the study shape (default runs/shakespeare_char_cpu if present)")
    p.add_argument("--random-init", action="store_true", help="ignore the default run: random weights")
    p.add_argument("--parts", nargs="+", choices=["gptq", "qat"], default=["gptq", "qat"])
    p.add_argument("--gptq-sizes", nargs="+", choices=list(GPTQ_SIZES), default=list(GPTQ_SIZES))
    p.add_argument("--qat-sizes", nargs="+", choices=list(QAT_SIZES), default=list(QAT_SIZES))
    p.add_argument("--n", type=int, default=128, help="calibration windows")
    p.add_argument("--length", type=int, default=64, help="tokens per window (capped by the model's context)")
    p.add_argument("--steps", type=int, default=5, help="timed QAT/dense steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", help="result file (default benchmarks/results/quant_cost_<device>.json)")
    args = p.parse_args(argv)
    model_dir = args.model or (str(DEFAULT_RUN) if DEFAULT_RUN.is_dir() and not args.random_init else None)
    result = {
        "benchmark": "quant_cost: GPTQ per-layer/total time; QAT (fake-quant) train step vs dense",
        **common.environment("quant_cost"),
    }
    if "gptq" in args.parts:
        result["gptq"] = {s: gptq_case(s, model_dir, args.n, args.length) for s in args.gptq_sizes}
    if "qat" in args.parts:
        result["qat"] = [qat_case(s, args.steps, args.rounds) for s in args.qat_sizes]
    common.write("quant_cost", result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
