"""Calibration-based compression of a real LLM: GPTQ, SparseGPT and Wanda time per block and peak memory.

Usage:
    ziplm pull smollm2-135m
    python benchmarks/calib_llm.py                                  # 128 x 2048 tokens, blocks 0-1, all three
    python benchmarks/calib_llm.py --blocks 30 --n 16               # every block, 16 x 2048 tokens

For each method (Wanda 50%, SparseGPT 50%, GPTQ 4-bit g128 asymmetric), in a fresh process so that peak RSS
(getrusage ru_maxrss) and compilation are its own: the model (`--model`, anything `research.sources.load` takes),
`--n` x `--length` calibration tokens at seeded random offsets of `--corpus` (the WikiText-2 validation text by
default), then the method's `Transform.init` on the kernels of the first `--blocks` blocks. The walk
(`calib.walk`) holds one block's input for every calibration window at a time (N x L x d_model floats) and runs no
block after the last selected one, so the cost of K blocks is K times the cost of one (plus the embedding) and the
per-block numbers project to the whole model. Instrumented per block: `method_s`, the method's own work on the
block's 7 kernels (the visit: Wanda's scores and masks, SparseGPT's and GPTQ's solves), and `forward_s`, the rest
(the block's forward for the statistics, X^T X or the squared norms, and its forward on the new weights to give the
next block's input). Block 0's numbers include compilation; the summary uses the blocks after it.

Writes `benchmarks/results/calib_llm_<device>.json`. On CPU compare numbers within the file (method vs forward,
method vs method); absolute seconds only from a GPU.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy / jax load OpenBLAS (see prune_layerwise.py)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from research import files, hardware, sources  # noqa: E402
from research.compress import calib  # noqa: E402
from research.compress.prune import sparsegpt, wanda  # noqa: E402
from research.compress.quant import gptq  # noqa: E402
from research.data import corpora, dataset, tokenizers  # noqa: E402

CORPUS = ROOT.parent / "shared" / "data" / "wikitext-2" / "tokens" / "wiki.valid.tokens"
METHODS = {  # (where) -> Transform
    "wanda": lambda where: wanda.wanda(0.5, where=where),
    "sparsegpt": lambda where: sparsegpt.sparsegpt(0.5, where=where),
    "gptq": lambda where: gptq.gptq(4, granularity="group", group_size=128, where=where),
}
LABELS = {"wanda": "Wanda 50%", "sparsegpt": "SparseGPT 50%", "gptq": "GPTQ 4-bit g128 (asymmetric)"}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def child(method: str, model: str, corpus: str, n: int, length: int, blocks: int, batch_size: int) -> dict:
    """One method's `init` on the first `blocks` blocks, timed per block, in this (fresh) process."""
    t0 = time.perf_counter()
    m = sources.load(model)
    jax.block_until_ready(m.params)
    load_s, rss_load = time.perf_counter() - t0, peak_rss_mib()
    tok = tokenizers.load(m.tokenizer)
    tokens = np.asarray(dataset.tokenize_cached(corpora.load(corpus).text, tok), np.int32)
    inputs = calib.sample(tokens, n, length, seed=0, max_len=m.cfg.max_seq_len)
    c = calib.Calibration(m.graphdef, inputs, batch_size=batch_size)
    blocks = min(blocks, m.cfg.n_layer)
    where = rf"layers/({'|'.join(map(str, range(blocks)))})/(attn|mlp)/\w+/kernel"
    t = METHODS[method](where)

    marks: list[tuple[int, float, float]] = []  # (block, visit start, visit end)
    walk = calib.walk

    def timed_walk(calib_data, params, paths, visit, **kw):
        def timed_visit(i, stats, n_tokens, kernels):
            jax.block_until_ready(stats)
            start = time.perf_counter()
            out = jax.block_until_ready(visit(i, stats, n_tokens, kernels))
            marks.append((i, start, time.perf_counter()))
            return out

        return walk(calib_data, params, paths, timed_visit, **kw)

    calib.walk = timed_walk
    start = time.perf_counter()
    state = jax.block_until_ready(t.init(m.params, jax.random.key(0), c))
    total = time.perf_counter() - start
    del state
    per_block, prev = [], start
    for i, s, e in marks:
        per_block.append({"block": i, "forward_s": s - prev, "method_s": e - s})
        prev = e
    steady = per_block[1:] or per_block
    mean = {k: sum(b[k] for b in steady) / len(steady) for k in ("forward_s", "method_s")}
    return {
        "method": LABELS[method],
        "blocks": blocks,
        "kernels_per_block": 7,
        "init_s": total,
        "per_block": per_block,
        "steady_block_s": {**mean, "total_s": mean["forward_s"] + mean["method_s"]},
        "method_share": mean["method_s"] / (mean["forward_s"] + mean["method_s"]),
        "projected_all_blocks_s": total + (m.cfg.n_layer - blocks) * (mean["forward_s"] + mean["method_s"]),
        "load_s": load_s,
        "peak_rss_after_load_mib": rss_load,
        "peak_rss_mib": peak_rss_mib(),
        "one_block_input_mib": inputs.size * m.cfg.d_model * 4 / 2**20,
        "fp32_weights_mib": sum(x.size for x in jax.tree.leaves(m.params)) * 4 / 2**20,
        "model_layers": m.cfg.n_layer,
        "calibration": {"windows": n, "length": int(inputs.shape[1]), "tokens": int(inputs.size), "corpus": corpus},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="model source (zoo name, .gguf, HF dir, run dir)")
    p.add_argument("--corpus", default=str(CORPUS), help="calibration text")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--n", type=int, default=128, help="calibration windows")
    p.add_argument("--length", type=int, default=2048, help="tokens per window (capped by the model's context)")
    p.add_argument("--blocks", type=int, default=2, help="calibrate the first K blocks (the rest project from them)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", help="result file (default benchmarks/results/calib_llm_<device>.json)")
    args = p.parse_args()
    if args.child:
        r = child(args.child, args.model, args.corpus, args.n, args.length, args.blocks, args.batch_size)
        print(json.dumps(r))
        return
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        sys.exit(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if not Path(args.corpus).is_file():
        sys.exit(f"calibration text not found: {args.corpus}; pass --corpus FILE")
    load = os.getloadavg()
    rows = {}
    for method in methods:
        cmd = [sys.executable, __file__, "--child", method, "--model", args.model, "--corpus", args.corpus]
        cmd += ["--n", str(args.n), "--length", str(args.length), "--blocks", str(args.blocks)]
        cmd += ["--batch-size", str(args.batch_size)]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if r.returncode:
            sys.exit(f"{method} failed:\n{r.stderr[-4000:]}")
        rows[method] = row = json.loads(r.stdout.strip().splitlines()[-1])
        b = row["steady_block_s"]
        print(
            f"{method:10s} per block: forward {b['forward_s']:7.1f}s  method {b['method_s']:7.1f}s  "
            f"({row['method_share']:.0%} method)  "
            f"all {row['model_layers']} blocks ~{row['projected_all_blocks_s']:.0f}s  "
            f"peak RSS {row['peak_rss_mib']:.0f} MiB ({row['fp32_weights_mib']:.0f} MiB fp32 weights, "
            f"{row['one_block_input_mib']:.0f} MiB per block input)",
            flush=True,
        )
    result = {
        "benchmark": "calibration-based compression of a real LLM: time per block, peak memory",
        "command": "python " + " ".join(sys.argv),
        "device": hardware.describe(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),  # fewer under taskset
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "load_average_at_start": load,
        "model": args.model,
        "methods": rows,
    }
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"calib_llm_{hardware.slug()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
