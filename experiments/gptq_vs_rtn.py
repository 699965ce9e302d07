"""Why GPTQ can lose to RTN on SmolLM2: the layer objective on the calibration text and on the evaluated text.

    ziplm pull smollm2-135m
    python experiments/gptq_vs_rtn.py                 # blocks 0-3, 16 x 2048 tokens per text (~15 min on 2 cores)

GPTQ minimises, per linear layer, the output error on its calibration inputs, tr(dW^T H dW) with H = X^T X. Its
win over round-to-nearest (RTN) holds on other text only as far as that text's H resembles the calibration H. For
the first `--blocks` blocks of SmolLM2-135M (Q4_1 GGUF, dequantized) this script measures, per kernel, the output
error per token, tr(dW^T H dW) / tokens, of three quantizations of the dense kernel (4-bit, groups of 128,
asymmetric integer zero point: the table rows' grid):
  - RTN;
  - GPTQ calibrated on the tables' text: 16 x 2048 tokens of WikiText-2 validation (`wiki.valid.tokens`, the
    tokenized release, with `<unk>` and spaces around punctuation);
  - GPTQ calibrated on raw text: 16 x 2048 tokens of `smollm2.RAW_CALIBRATION` (WikiText-2 test beyond the first
    32 evaluated windows);
each scored under the H of every text: the two calibration texts and the evaluated text (the first `--windows`
GPTQ-protocol windows of WikiText-2 test, the windows the tables score). Every H comes from the dense model's
activations (each block's inputs from the dense blocks before it), so the three are compared on equal inputs.
Writes experiments/results/gptq_vs_rtn.json; the summary is the geometric mean over kernels of GPTQ's error over
RTN's, per scoring text.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.configs import smollm2  # noqa: E402
from research import files, models, sources  # noqa: E402
from research.compress import calib, core  # noqa: E402
from research.compress.quant import gptq  # noqa: E402
from research.compress.quant import grid as qgrid  # noqa: E402
from research.data import corpora, dataset, tokenizers  # noqa: E402
from research.eval import metrics  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "wikitext-2"
GRID = qgrid.Grid(4, False, "group", 128)
EVALUATED = "evaluated: wiki.test windows"


def hessians(m, inputs: np.ndarray, blocks: int) -> tuple[dict, int]:
    """{kernel path: X^T X} of the dense model's inputs to the first `blocks` blocks' kernels, and the tokens."""
    where = rf"layers/({'|'.join(map(str, range(blocks)))})/(attn|mlp)/\w+/kernel"
    out = {}

    def record(i, stats, n_tokens, kernels):
        out.update({f"layers/{i}/{name}/kernel": np.asarray(stats[name], np.float64) for name in kernels})
        return kernels

    c = calib.Calibration(m.graphdef, inputs, batch_size=4)
    calib.walk(c, m.params, core.select(m.params, where), record, stat="hessian", progress=False)
    return out, int(inputs.size)


def error(dw: np.ndarray, h: np.ndarray, n: int) -> float:
    """tr(dW^T H dW) / n: the squared output error per token (dW is (in, out))."""
    return float(np.sum(dw * (h @ dw)) / n)


def output_stats(dense, windows: np.ndarray, workdir: Path) -> dict:
    """Per scored token, for the dense model and the tables' RTN and GPTQ 4-bit g128 rows: cross-entropy against
    the text, entropy of the predicted distribution and KL(dense || model), in nats, over `windows`."""
    loaded = {"dense": dense}
    for row in ("rtn4_g128", "gptq4_g128"):
        path = workdir / f"llm-{row}"
        if not (path / "summary.json").is_file():
            sys.exit(f"{path} is missing: run python experiments/llm_tables.py --rows {row} --windows 16 --calib 16")
        loaded[row] = sources.load(str(path))

    def log_probs(m):
        return jax.jit(lambda p, x: jax.nn.log_softmax(models.merge(m.graphdef, p)(x).astype(jnp.float32), -1))

    fns = {name: log_probs(m) for name, m in loaded.items()}
    totals = {name: {"cross_entropy": 0.0, "entropy": 0.0, "kl_from_dense": 0.0} for name in loaded}
    n = 0
    for w in windows:  # each window scores its tokens 1 .. W-1 (the GPTQ protocol)
        x, y = jnp.asarray(w[None, :-1]), jnp.asarray(w[1:])
        ref = None
        for name, m in loaded.items():
            lp = fns[name](m.params, x)[0]  # (W-1, V)
            ref = lp if ref is None else ref
            t = totals[name]
            t["cross_entropy"] += float(-jnp.take_along_axis(lp, y[:, None], -1).sum())
            t["entropy"] += float(-(jnp.exp(lp) * lp).sum())
            t["kl_from_dense"] += float((jnp.exp(ref) * (ref - lp)).sum())
        n += int(y.size)
    return {
        "windows": len(windows),
        "tokens": n,
        "per_token": {name: {k: v / n for k, v in t.items()} for name, t in totals.items()},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=4, help="first K blocks (7 kernels each)")
    p.add_argument("--n", type=int, default=16, help="windows of 2048 tokens per calibration text")
    p.add_argument("--windows", type=int, default=16, help="evaluated windows (the tables' prefix)")
    p.add_argument("--outputs", type=int, default=4, help="evaluated windows for the output statistics (0: none)")
    p.add_argument("--workdir", default=str(ROOT / "runs"), help="where llm_tables.py's rows are")
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "gptq_vs_rtn.json"))
    args = p.parse_args(argv)
    if not 0 < args.windows <= smollm2.RAW_MAX_WINDOWS:
        sys.exit(f"--windows must be 1..{smollm2.RAW_MAX_WINDOWS} (the raw calibration text starts after those)")
    t0 = time.time()
    m = sources.load("smollm2-135m")
    tok = tokenizers.load(m.tokenizer)

    def tokens(spec):
        return np.asarray(dataset.tokenize_cached(corpora.load(spec).text, tok), np.int32)

    test = np.concatenate([tok.added_prefix, tokens(f"wikitext:{SHARED / 'raw' / 'wiki.test.raw'}")])
    evaluated = metrics.windows(test, metrics.Protocol.gptq(2048), args.windows)[0]
    texts = {
        "calibration: wiki.valid.tokens": calib.sample(tokens(str(SHARED / "tokens" / "wiki.valid.tokens")), args.n),
        "calibration: raw text": calib.sample(tokens(smollm2.RAW_CALIBRATION), args.n),
        EVALUATED: evaluated,
    }
    hs = {}
    for name, inputs in texts.items():
        print(f"statistics of {name} ({inputs.size:,} tokens)", flush=True)
        hs[name] = hessians(m, inputs, args.blocks)
    flat = core.touched(m.params)
    kernels, ratios = {}, {name: [] for name in texts}
    for path in hs[EVALUATED][0]:
        w = jnp.asarray(flat[path], jnp.float32)
        s, z = qgrid.fit(w, GRID)
        candidates = {"rtn": qgrid.dequantize(qgrid.quantize(w, s, z, GRID), s, z, GRID)}
        for cal in list(texts)[:2]:
            c, s2, z2 = gptq.quantize_layer(w, hs[cal][0][path], GRID, name=path)
            candidates[f"gptq ({cal.removeprefix('calibration: ')})"] = qgrid.dequantize(c, s2, z2, GRID)
        row = {}
        for method, wq in candidates.items():
            dw = np.asarray(wq - w, np.float64)
            row[method] = {score: error(dw, hs[score][0][path], hs[score][1]) for score in texts}
        kernels[path] = row
        for score in texts:
            ratios[score].append(row["gptq (wiki.valid.tokens)"][score] / row["rtn"][score])
        under = ", ".join(f"{k}: {r[-1]:.3f}" for k, r in ratios.items())
        print(f"{path}: GPTQ (valid tokens) / RTN error under {under}", flush=True)
    raw_ratios = {
        score: [kernels[k]["gptq (raw text)"][score] / kernels[k]["rtn"][score] for k in kernels] for score in texts
    }

    def gmean(xs):
        return math.exp(sum(math.log(x) for x in xs) / len(xs))

    summary = {
        "gptq_valid_tokens_over_rtn": {k: gmean(v) for k, v in ratios.items()},
        "gptq_raw_text_over_rtn": {k: gmean(v) for k, v in raw_ratios.items()},
        "kernels_where_gptq_valid_tokens_loses_on_evaluated": sum(r > 1 for r in ratios[EVALUATED]),
        "kernels": len(kernels),
    }
    outputs = output_stats(m, evaluated[: args.outputs], Path(args.workdir)) if args.outputs else None
    result = dict(
        experiment="GPTQ vs RTN layer objective on the calibration and evaluated texts, SmolLM2-135M",
        command="python " + " ".join(["experiments/gptq_vs_rtn.py", *sys.argv[1:]]),
        grid=GRID.describe(),
        texts={k: int(v.size) for k, v in texts.items()},
        blocks=args.blocks,
        summary=summary,
        outputs=outputs,
        kernels=kernels,
        seconds=time.time() - t0,
        device=f"{jax.devices()[0].platform} x {jax.device_count()}",
    )
    files.write_json(Path(args.out), result)
    for k, v in summary.items():
        print(f"{k}: {v}")
    if outputs:
        for name, v in outputs["per_token"].items():
            print(f"{name}: " + ", ".join(f"{k} {x:.4f}" for k, x in v.items()))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
