"""The deploy table: SmolLM2-135M as each export format, bytes on disk and the perplexity each one gives.

    ziplm pull smollm2-135m
    python experiments/deploy_table.py [--windows 8] [--window 512] [--calib 64] [--workdir runs/deploy]

Rows: the source GGUF file (Q4_1 blocks, a Q8_0 embedding), its `.zlm`, its GGUF exports (`--type auto`: the
same bytes; f16), llama.cpp's own Q4_0 of it (`llama_model_quantize` on an F32 export: its default Q4_0 mix,
round-to-nearest), and GPTQ 4-bit constrained to Q4_0's grid (`gptq(gguf="q4_0")`, calibrated on `--calib`
windows of raw WikiText-2 test text beyond the evaluated windows) as `.zlm`, as GGUF (`--type auto`: GPTQ's codes
as they are in Q4_0, the embedding in its exact Q8_0) and as compressed-tensors (`--dtype float16`: the fp16
scales kept exactly). Each file is read back by ziplm and scored with the GPTQ protocol on the first `--windows`
disjoint windows of `--window` tokens of WikiText-2 raw test; each GGUF file is also scored by llama.cpp itself
(`llama-cpp-python`, when installed: its CPU kernels multiply Q8-quantized activations with the blocks, so its
perplexity differs from ziplm's dequantized float evaluation by that rounding), and on the first window the two
runtimes' logits of the same file are compared (largest and mean difference, top-1 agreement).

Writes experiments/results/deploy.json and deploy.md. The dense model is SmolLM2-135M-Instruct in Q4_1 (its GGUF
release), not the bf16 release: state it with any number from here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.configs import smollm2  # noqa: E402
from research import errors, files, sources  # noqa: E402
from research.coding import artifact, pack  # noqa: E402
from research.compress import pipeline  # noqa: E402
from research.data import corpora, tokenizers  # noqa: E402
from research.eval import metrics  # noqa: E402
from research.export import compressed_tensors, gguf  # noqa: E402
from research.models import zoo  # noqa: E402

RESULTS = ROOT / "experiments" / "results"
WIKI = smollm2.SHARED / "raw" / "wiki.test.raw"


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def ziplm_scores(model: str, tokens, token_bytes, window: int, windows: int, reference) -> dict:
    """Perplexity and bits per byte as ziplm computes them, KL(source || model) and top-1 agreement with the source."""
    m = sources.load(model)
    protocol = metrics.Protocol.gptq(window)
    r = metrics.evaluate(
        m.graphdef, m.params, tokens, token_bytes, protocol, batch_size=4, max_windows=windows, reference=reference
    )
    return {k: r[k] for k in ("perplexity", "bits_per_byte", "kl", "top1_agreement")}


def llama_cpp_scores(path: Path, tokens, window: int, windows: int, reference=None) -> dict | None:
    """Perplexity by llama.cpp itself (GPTQ protocol), and its largest logit difference from `reference` (the first
    window's logits as ziplm computes them)."""
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=window, n_batch=window, logits_all=True, verbose=False)
    nll, n, first = 0.0, 0, None
    for i in range(windows):
        ids = [int(t) for t in tokens[i * window : (i + 1) * window]]
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids)], np.float64)
        first = logits if first is None else first
        z = logits[:-1] - logits[:-1].max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        nll -= logp[np.arange(len(ids) - 1), ids[1:]].sum()
        n += len(ids) - 1
    out = {"perplexity": float(np.exp(nll / n))}
    if reference is not None:  # the first window: llama.cpp's logits against ziplm's (of the source model)
        diff = np.abs(first - reference)
        out.update(
            max_logit_diff_vs_ziplm=float(diff.max()),
            mean_logit_diff_vs_ziplm=float(diff.mean()),
            top1_agreement_vs_ziplm=float(np.mean(first.argmax(-1) == reference.argmax(-1))),
        )
    return out


def first_window_logits(model: str, tokens, window: int):
    from research import models

    m = sources.load(model)
    return np.asarray(models.merge(m.graphdef, m.params)(tokens[None, :window]), np.float64)[0]


def llama_cpp_q4_0(f32: Path, out: Path) -> bool:
    """llama.cpp's own Q4_0 (its default mix) of an F32 GGUF file; False without llama-cpp-python."""
    try:
        import ctypes

        import llama_cpp
    except ImportError:
        return False
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = 2
    with contextlib.redirect_stderr(sys.stdout):
        rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        raise errors.UserError(f"llama_model_quantize failed with status {rc}")
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=8, help="evaluated windows (default 8)")
    ap.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    ap.add_argument("--calib", type=int, default=64, help="GPTQ calibration windows of --window tokens (default 64)")
    ap.add_argument("--workdir", default="runs/deploy")
    args = ap.parse_args(argv)
    src = zoo.cached("smollm2-135m")
    if src is None:
        raise errors.UserError("SmolLM2-135M is not cached: run `ziplm pull smollm2-135m` first")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    dense = sources.load(str(src))
    tok = tokenizers.load(dense.tokenizer)
    text = corpora.load(f"wikitext:{WIKI}").text[:200_000]
    tokens = np.concatenate([tok.added_prefix, tok.encode(text)]).astype(np.int32)  # as `ziplm eval --protocol gptq`
    assert len(tokens) >= args.windows * args.window
    rows, t0 = [], time.time()
    reference = (dense.graphdef, dense.params)

    def row(name, path, how, exact_as=None, llama=True):
        t = time.time()
        r = {"row": name, "file": str(path), "bytes": size(path), "how": how}
        if exact_as is not None:  # the same values as another row, checked leaf by leaf: its scores carry over
            keys = ("perplexity", "bits_per_byte", "kl", "top1_agreement")
            r.update({k: exact_as[k] for k in keys}, same_values_as=exact_as["row"])
        else:
            r.update(ziplm_scores(str(path), tokens, tok.token_bytes, args.window, args.windows, reference))
        if llama and path.suffix == ".gguf":  # the same file in both runtimes
            own = first_window_logits(str(path), tokens, args.window)
            r["llama_cpp"] = llama_cpp_scores(path, tokens, args.window, args.windows, own)
        r["seconds"] = round(time.time() - t, 1)
        rows.append(r)
        print(json.dumps(r), flush=True)
        return r

    base = row("source GGUF (Q4_1 blocks, Q8_0 embedding)", src, "as released")
    zlm = work / "dense.zlm"
    artifact.pack_model(dense, zlm, overwrite=True)
    same(dense.params, sources.load(str(zlm)).params)
    row("dense .zlm (ziplm pack)", zlm, "bit-exact entropy-coded", exact_as=base)
    auto = gguf.export(dense.cfg, dense.params, work / "dense-auto.gguf", tokenizer=dense.tokenizer, overwrite=True)
    row("dense -> GGUF --type auto", Path(auto["file"]), "every tensor in its source type, byte for byte", base, False)
    f16 = gguf.export(
        dense.cfg, dense.params, work / "dense-f16.gguf", tokenizer=dense.tokenizer, type="f16", overwrite=True
    )
    row("dense -> GGUF --type f16", Path(f16["file"]), "rounded to float16")
    f32 = gguf.export(
        dense.cfg, dense.params, work / "dense-f32.gguf", tokenizer=dense.tokenizer, type="f32", overwrite=True
    )
    if llama_cpp_q4_0(Path(f32["file"]), work / "llamacpp-q4_0.gguf"):
        row("llama.cpp's own Q4_0 of the dense model", work / "llamacpp-q4_0.gguf", "llama_model_quantize, RTN")
    Path(f32["file"]).unlink()
    ours = gguf.export(
        dense.cfg, dense.params, work / "dense-q4_0.gguf", tokenizer=dense.tokenizer, type="q4_0", overwrite=True
    )
    row("dense -> GGUF --type q4_0 (every matrix)", Path(ours["file"]), "gguf package's RTN")

    cfg = smollm2.get_config("gptq_q4_0+raw")  # gptq(gguf="q4_0"), calibrated on raw text beyond the windows
    cfg.calibration.update(n=args.calib, length=args.window, batch_size=4)
    cfg.eval.update(window=args.window, max_windows=args.windows, agreement=False)
    summary = pipeline.run(cfg, str(work / "gptq-q4_0"), overwrite=True)
    zlm = work / "gptq-q4_0" / "model.zlm"
    gptq = row("GPTQ 4-bit gguf=q4_0 .zlm", zlm, "ziplm compress (GPTQ, Q4_0's grid)")
    m = sources.load(str(zlm))
    found = pack.codes_of(zlm)
    g = gguf.export(m.cfg, m.params, work / "gptq-q4_0.gguf", codes=found, tokenizer=m.tokenizer, overwrite=True)
    same(m.params, sources.load(g["file"]).params)
    row("GPTQ -> GGUF --type auto", Path(g["file"]), "GPTQ codes as they are (Q4_0), embedding Q8_0 exact", gptq)
    c = compressed_tensors.export(
        m.cfg, m.params, work / "gptq-ct", codes=found, tokenizer=m.tokenizer, dtype="float16", overwrite=True
    )
    assert c["rounded_scales"] == []
    how = "int4 symmetric g32 (fp16 scales exact); embedding, norms in float16"
    row("GPTQ -> compressed-tensors --dtype float16", work / "gptq-ct", how, exact_as=gptq)
    result = {
        "protocol": metrics.Protocol.gptq(args.window).describe()
        + f"; first {args.windows} windows of WikiText-2 raw test ({args.windows * (args.window - 1)} scored tokens)",
        "model": "SmolLM2-135M-Instruct, Q4_1 GGUF release (ziplm pull smollm2-135m)",
        "calibration": f"{args.calib} x {args.window} tokens of raw WikiText-2 test beyond the evaluated windows",
        "gptq_summary": {k: summary.get(k) for k in ("dense", "compressed", "stages") if k in summary},
        "rows": rows,
        "machine": platform.platform(),
        "seconds": round(time.time() - t0),
    }
    files.write_json(RESULTS / "deploy.json", result)
    (RESULTS / "deploy.md").write_text(table(result))
    print(table(result))
    shutil.rmtree(work / "gptq-q4_0" / "checkpoints", ignore_errors=True)
    return 0


def same(a, b) -> None:
    from research import tree

    fa, fb = tree.flatten(a), tree.flatten(b)
    bad = [p for p in fa if not np.array_equal(np.asarray(fa[p]), np.asarray(fb[p]))]
    if bad:
        raise AssertionError(f"values differ after the round trip: {bad[:3]}")


def table(result: dict) -> str:
    lines = [
        "| row | bytes | MB | perplexity (ziplm) | KL vs source | top-1 vs source | perplexity (llama.cpp) | how |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lc = (r.get("llama_cpp") or {}).get("perplexity")
        ppl = f"{r['perplexity']:.2f}" + (" (same values)" if r.get("same_values_as") else "")
        lc = f"{lc:.2f}" if lc else "-"
        kl, top = f"{r['kl']:.4f}", f"{r['top1_agreement']:.4f}"
        lines.append(
            f"| {r['row']} | {r['bytes']:,} | {r['bytes'] / 1e6:.1f} | {ppl} | {kl} | {top} | {lc} | {r['how']} |"
        )
    return (
        "\n".join(lines) + f"\n\n{result['protocol']}; {result['model']}; GPTQ calibration: {result['calibration']}.\n"
    )


if __name__ == "__main__":
    try:
        sys.exit(main())
    except errors.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
