"""Throughput of coding data with a model: encode and decode tokens/s against the same model's eval tokens/s in the
same run, peak memory, bits per byte, and incompressible input (random bytes, stored raw).

Usage:
    python benchmarks/lm_coding.py [--model runs/demo] [--bytes 8192] [--batch-sizes 1,4,16,64]
    python benchmarks/lm_coding.py --model ~/.cache/ziplm/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --data ../shared/data/wikitext-2/raw/wiki.test.raw --bytes 4096 --batch-sizes 16

Data: the first --bytes bytes of --data (default: a run's validation split; for other models WikiText-2 raw test),
and as many random bytes. Per batch size, a cold encode + decode compiles the step shapes (reported as cold), then
--repeats rounds each time eval, encode and decode in turn (warm); every rate is the median of its rounds, so the
ratios compare measurements taken minutes apart at most. Every decode is compared with the input. The baseline is
`metrics.evaluate` on the same tokens (one non-overlapping window of min(tokens, the model's context), batch 1).
Targets (issue 13): encode and decode tokens/s at least half of eval's, decode as fast as encode, peak memory
bounded by the window used (the KV cache sized to it, not to the model's context), random bytes grow by at most
10 bytes. Peak RSS is the process's high-water mark after loading and after coding (it includes the model). On
CPU compare ratios, not absolute rates. Writes
benchmarks/results/lm_coding_<device>[_<tag>].json.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import numpy as np  # noqa: E402

from research import files, hardware, sources  # noqa: E402
from research.coding import lm  # noqa: E402
from research.data import corpora, dataset, tokenizers  # noqa: E402
from research.eval import metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "raw" / "wiki.test.raw"


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _eval_rate(m, tokens, tok) -> dict:
    window = int(min(len(tokens) - 1, m.cfg.max_seq_len))
    protocol = metrics.Protocol(window, window)
    t0 = time.perf_counter()
    r = metrics.evaluate(m.graphdef, m.params, tokens, tok.token_bytes, protocol, batch_size=1, progress=False)
    return dict(seconds=time.perf_counter() - t0, tokens=r["tokens"], bits_per_byte=r["bits_per_byte"], window=window)


def _data(args, m) -> tuple[bytes, str]:
    if args.data:
        return Path(args.data).expanduser().read_bytes()[: args.bytes], f"first {args.bytes} bytes of {args.data}"
    if m.run_config is not None:
        run = m.run_config
        text = dataset.split_text(corpora.load(run.data.corpus).text, run.data.val_fraction)[1]
        return text.encode()[: args.bytes], f"first {args.bytes} bytes of {run.data.corpus} (validation split)"
    return WIKITEXT.read_bytes()[: args.bytes], f"first {args.bytes} bytes of WikiText-2 raw test"


def _code_row(m, data, b, context, repeats, tokens, tok) -> dict:
    """Cold encode + decode, then `repeats` rounds of (eval, encode, decode), each rate the median of its rounds."""
    cold_t0 = time.perf_counter()
    blob, _ = lm.encode(data, m, batch_size=b, context=context)
    out, _ = lm.decode(blob, m)
    cold = time.perf_counter() - cold_t0
    assert out == data
    evals, encs, decs = [], [], []
    for _ in range(repeats):
        evals.append(_eval_rate(m, tokens, tok))
        blob2, enc = lm.encode(data, m, batch_size=b, context=context)
        out, dec = lm.decode(blob2, m)
        assert out == data and blob2 == blob
        encs.append(enc)
        decs.append(dec)
    eval_tps = float(np.median([e["tokens"] / e["seconds"] for e in evals]))
    enc_tps = float(np.median([e["tokens_per_s"] for e in encs]))
    dec_tps = float(np.median([d["tokens_per_s"] for d in decs]))
    enc, dec = encs[-1], decs[-1]
    return dict(
        batch_size=b,
        context=enc["context"],
        chunk_len=enc["chunk_len"],
        tokens=enc["tokens"],
        coded_bytes=enc["coded_bytes"],
        stored=enc["stored"],
        bits_per_byte=enc["bits_per_byte"],
        ideal_bits_per_byte=enc["ideal_bits_per_byte"],
        eval_bits_per_byte=evals[-1]["bits_per_byte"],
        eval_tokens_per_s=eval_tps,
        encode_tokens_per_s=enc_tps,
        decode_tokens_per_s=dec_tps,
        encode_vs_eval=enc_tps / eval_tps,
        decode_vs_eval=dec_tps / eval_tps,
        decode_vs_encode=dec_tps / enc_tps,
        rounds=[
            dict(eval=e["tokens"] / e["seconds"], encode=x["tokens_per_s"], decode=d["tokens_per_s"])
            for e, x, d in zip(evals, encs, decs)
        ],
        encode_kb_per_s=float(np.median([e["kb_per_s"] for e in encs])),
        decode_kb_per_s=float(np.median([d["kb_per_s"] for d in decs])),
        encode_model_share=enc["model_seconds"] / enc["seconds"],
        encode_coder_share=enc["coder_seconds"] / enc["seconds"],
        decode_coder_share=dec["coder_seconds"] / dec["seconds"],
        cold_encode_plus_decode_seconds=cold,
        cache_capacity=enc["cache_capacity"],
        cache_mib=enc["cache_bytes"] / 2**20,
        cache_mib_at_the_models_context=lm.cache_bytes(m.cfg, b, m.cfg.max_seq_len) / 2**20,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "runs/demo"), help="any model source (run, packed file, GGUF, HF)")
    p.add_argument("--data", help="file to code (default: the run's validation split, else WikiText-2 raw test)")
    p.add_argument("--bytes", type=int, default=8192)
    p.add_argument("--batch-sizes", default="1,4,16,64")
    p.add_argument("--context", type=int, help="the coder's context (default: lm's default)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds of eval, encode and decode (median)")
    p.add_argument("--tag", help="suffix of the results file name")
    args = p.parse_args(argv)
    if not Path(args.model).expanduser().exists():
        sys.exit(f"{args.model} does not exist: run `make demo` first (or pass --model)")
    t0 = time.perf_counter()
    m = sources.load(args.model)
    load = dict(seconds=time.perf_counter() - t0, peak_rss_mib=_rss_mib())
    data, what = _data(args, m)
    tok = tokenizers.load(m.tokenizer)
    tokens = tok.encode(data.decode("utf-8", "replace"))
    _eval_rate(m, tokens, tok)  # compile
    rows = []
    for b in (int(x) for x in args.batch_sizes.split(",")):
        row = _code_row(m, data, b, args.context, args.repeats, tokens, tok)
        rows.append(row)
        print(
            f"batch {b:3d}: encode {row['encode_tokens_per_s']:6.1f} tokens/s ({row['encode_vs_eval']:.2f}x eval), "
            f"decode {row['decode_tokens_per_s']:6.1f} tokens/s ({row['decode_vs_eval']:.2f}x eval, "
            f"{row['decode_vs_encode']:.2f}x encode), eval {row['eval_tokens_per_s']:.1f} tokens/s; "
            f"{row['bits_per_byte']:.4f} bits/byte (eval {row['eval_bits_per_byte']:.4f}); cache "
            f"{row['cache_capacity']} slots ({row['cache_mib']:.1f} MiB; {row['cache_mib_at_the_models_context']:.0f} "
            f"MiB at the model's context); coder {row['encode_coder_share']:.1%} / {row['decode_coder_share']:.1%}",
            flush=True,
        )
    coding_rss = _rss_mib()
    noise = np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes()
    lm.encode(noise, m, batch_size=rows[-1]["batch_size"], context=args.context)  # compile its shapes
    blob, enc = lm.encode(noise, m, batch_size=rows[-1]["batch_size"], context=args.context)
    back, dec = lm.decode(blob, m)
    assert back == noise
    random_row = dict(
        input_bytes=len(noise),
        coded_bytes=len(blob),
        growth_bytes=len(blob) - len(noise),
        stored=enc["stored"],
        tokens=enc["tokens"],
        gave_up_after_tokens=enc["gave_up_after_tokens"],
        escape_bytes=enc["escape_bytes"],
        encode_seconds=enc["seconds"],
        encode_kb_per_s=enc["kb_per_s"],
        decode_kb_per_s=dec["kb_per_s"],
    )
    print(
        f"random bytes: {len(noise)} -> {len(blob)} bytes (stored: {enc['stored']}, gave up after "
        f"{enc['gave_up_after_tokens']} of {enc['tokens']} tokens), encode {enc['kb_per_s']:.3g} kB/s",
        flush=True,
    )
    eval_rss = _rss_mib()
    print(f"peak RSS: {load['peak_rss_mib']:.0f} MiB after load, {coding_rss:.0f} after coding")
    name = f"lm_coding_{hardware.slug()}" + (f"_{args.tag}" if args.tag else "")
    out = Path(__file__).parent / "results" / f"{name}.json"
    files.write_json(
        out,
        dict(
            benchmark="coding data with a model: encode/decode tokens/s vs the same model's eval tokens/s, memory",
            **common.environment("lm_coding"),
            data=what,
            model=args.model,
            model_context=m.cfg.max_seq_len,
            vocab_size=m.cfg.vocab_size,
            target=(
                "encode and decode tokens/s >= 0.5x eval's, decode as fast as encode, cache sized to the window "
                "used, random bytes grow by at most 10 bytes"
            ),
            eval_protocol="one non-overlapping window of min(tokens, the model's context), batch 1, warm",
            repeats=args.repeats,
            load=load,
            peak_rss_mib=dict(after_load=load["peak_rss_mib"], after_coding=coding_rss, at_end=eval_rss),
            rows=rows,
            random_bytes=random_row,
        ),
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
