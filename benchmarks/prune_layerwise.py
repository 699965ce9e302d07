"""Layer-wise pruning cost: Wanda and SparseGPT time per kernel and in total, and peak memory.

Usage:
    python benchmarks/prune_layerwise.py                          # the Tiny Shakespeare study shape and d_model 512
    python benchmarks/prune_layerwise.py --model runs/shakespeare  # a trained run in place of the study shape's
                                                                   # random weights

Each (size, method) runs two stages, each in a fresh subprocess, so that peak RSS (getrusage ru_maxrss, MiB) and
compilation are the stage's own. On `--n` x `--length` calibration tokens (Tiny Shakespeare bytes from
../shared/data when present, else random):
  - init stage: `walk`, `calib.walk` with a visit that changes nothing (the forward passes and statistics alone,
    the baseline), then `init`, the method's `Transform.init` at `--sparsity` (walk + pruning of every block kernel);
    peak RSS after it;
  - layers stage: per kernel, the per-layer work on that kernel's statistic from the dense model (Wanda: scores and
    per-output mask; SparseGPT: `prune_layer`), and their total.
Every timing is taken twice: `first_s` includes compilation (kernels of one shape compile once, on their first
layer; init's first call reuses the walk's compiled blocks), `s` is a second call with everything compiled.
Writes `benchmarks/results/prune_layerwise_<device>.json`. On CPU compare the numbers within one file (ratios to
the walk, SparseGPT to Wanda).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from research import files, hardware, models, sources
from research.compress import calib, core
from research.compress.prune import masks, sparsegpt, wanda
from research.data import tokenizers
from research.models import config as mc

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
SIZES = {
    "shakespeare": dict(vocab_size=256, n_layer=4, n_head=4, d_model=128, max_seq_len=64, bias=False),
    "d512": dict(vocab_size=256, n_layer=4, n_head=4, d_model=512, max_seq_len=64, bias=False),
}
STAT = {"wanda": "sqnorm", "sparsegpt": "hessian"}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def twice(fn) -> tuple[float, float, object]:
    """(first call's seconds, second call's seconds, result), each call synchronised."""
    times = []
    for _ in range(2):
        t = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return times[0], times[1], out


def setup(size: str, model_dir: str | None, n: int, length: int):
    """(model config, graphdef, params, calibration, where the tokens came from)."""
    spec = "byte"
    if model_dir and size == "shakespeare":
        m = sources.load(model_dir)
        cfg, graphdef, params, spec = m.cfg, m.graphdef, m.params, m.tokenizer or "byte"
    else:
        cfg = mc.gpt2_style(**SIZES[size])
        graphdef, params = models.init(cfg)
    if SHAKESPEARE.is_file():
        tokens, source = tokenizers.load(spec).encode(SHAKESPEARE.read_text()), f"tinyshakespeare ({spec} tokens)"
    else:
        tokens, source = np.random.default_rng(0).integers(0, cfg.vocab_size, 200_000), "random tokens"
    inputs = calib.sample(tokens, n, length, seed=0, max_len=cfg.max_seq_len)
    return cfg, graphdef, params, calib.Calibration(graphdef, inputs), source


def wanda_layer(kernel, sqnorm, sparsity):
    mask = masks.from_scores({"k": wanda.scores(kernel, sqnorm)}, sparsity, group="output")["k"]
    return jnp.where(mask, kernel, 0), mask


def child(size: str, method: str, stage: str, model_dir: str | None, n: int, length: int, sparsity: float) -> dict:
    """One stage ("init": the walk and the transform; "layers": the per-kernel work) in a fresh process."""
    cfg, graphdef, params, c, source = setup(size, model_dir, n, length)
    jax.block_until_ready(params)
    out = {"peak_rss_setup_mib": peak_rss_mib()}
    paths = core.select(params, core.BLOCK_KERNELS)
    stat = STAT[method]
    if stage == "init":
        walk_first, walk_s, _ = twice(lambda: calib.walk(c, params, paths, lambda *a: a[3], stat=stat, progress=False))
        t = wanda.wanda(sparsity) if method == "wanda" else sparsegpt.sparsegpt(sparsity)
        init_first, init_s, state = twice(lambda: t.init(params, jax.random.key(0), c))
        return {
            **out,
            "model": cfg.to_dict(),
            "weights": model_dir if model_dir and size == "shakespeare" else "random init",
            "calibration": {
                "windows": n,
                "length": int(c.inputs.shape[1]),
                "tokens": int(c.inputs.size),
                "source": source,
            },
            "sparsity": sparsity,
            "masked_sparsity": masks.sparsity_of(t.masks(state))["total"],
            "walk": {"first_s": walk_first, "s": walk_s},
            "init": {"first_s": init_first, "s": init_s},
            "init_over_walk": init_s / walk_s,
            "peak_rss_init_mib": peak_rss_mib(),
        }
    stats = {}

    def record(i, s, n_tokens, kernels):
        stats.update({f"layers/{i}/{name}/kernel": s[name] for name in kernels})
        return kernels

    calib.walk(c, params, paths, record, stat=stat, progress=False)
    flat = core.touched(params)
    layers = {}
    for p in paths:
        if method == "wanda":
            fn = lambda p=p: wanda_layer(flat[p], stats[p], sparsity)
        else:
            fn = lambda p=p: sparsegpt.prune_layer(flat[p], stats[p], sparsity, name=p)
        first, s, _ = twice(fn)
        layers[p] = {"shape": list(flat[p].shape), "first_s": first, "s": s}
    total = {k: sum(v[k] for v in layers.values()) for k in ("first_s", "s")}
    return {"layers": layers, "layers_total": total, "peak_rss_layers_mib": peak_rss_mib()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="run directory for the study shape (research.sources.load); default random init")
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    p.add_argument("--methods", nargs="+", choices=list(STAT), default=list(STAT))
    p.add_argument("--n", type=int, default=128, help="calibration windows")
    p.add_argument("--length", type=int, default=64, help="tokens per window (capped by the model's context)")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument(
        "--blas-threads",
        default="1",
        help="OPENBLAS_NUM_THREADS of the measured processes ('' inherits); on small shared CPUs OpenBLAS threads "
        "spin against XLA's and the Cholesky factorisations run ~100x slower",
    )
    p.add_argument("--child", nargs=3, metavar=("SIZE", "METHOD", "STAGE"), help=argparse.SUPPRESS)
    p.add_argument("--out", help="result file (default benchmarks/results/prune_layerwise_<device>.json)")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.model, args.n, args.length, args.sparsity)))
        return

    load = os.getloadavg()
    env = {**os.environ, **({"OPENBLAS_NUM_THREADS": args.blas_threads} if args.blas_threads else {})}
    results: dict = {}
    for size in args.sizes:
        for method in args.methods:
            out = {}
            for stage in ("init", "layers"):
                cmd = [sys.executable, __file__, "--child", size, method, stage, "--n", str(args.n)]
                cmd += ["--length", str(args.length), "--sparsity", str(args.sparsity)]
                cmd += ["--model", args.model] if args.model else []
                r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
                if r.returncode:
                    sys.exit(f"{size}/{method}/{stage} failed:\n{r.stderr[-4000:]}")
                out.update(json.loads(r.stdout.strip().splitlines()[-1]))
            results.setdefault(size, {})[method] = out
            print(
                f"{size:12s} {method:10s} walk {out['walk']['s']:7.2f}s  init {out['init']['s']:7.2f}s "
                f"(first {out['init']['first_s']:6.2f}s)  kernels {out['layers_total']['s']:7.2f}s  "
                f"peak RSS {out['peak_rss_init_mib']:7.0f} MiB",
                flush=True,
            )
        if set(results[size]) == set(STAT):
            results[size]["sparsegpt_over_wanda"] = {
                "init": results[size]["sparsegpt"]["init"]["s"] / results[size]["wanda"]["init"]["s"],
                "kernels": results[size]["sparsegpt"]["layers_total"]["s"]
                / results[size]["wanda"]["layers_total"]["s"],
            }
    result = {
        "benchmark": "prune_layerwise",
        "command": "python " + " ".join(sys.argv),
        "device": hardware.describe(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "openblas_num_threads": env.get("OPENBLAS_NUM_THREADS"),
        "load_average_at_start": load,
        "sizes": results,
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"prune_layerwise_{hardware.slug()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
