"""Throughput of coding data with a model: encode and decode kB/s of the demo model at batch sizes 1..64, with the
time split between the model (the jitted KV-cache steps) and the range coder.

Usage:
    python benchmarks/lm_coding.py [--model runs/demo] [--bytes 8192] [--batch-sizes 1,4,16,64]

Data: the first --bytes bytes of the model's validation split (the demo's: pydoc text). Chunks of half the model's
context (the default), range coder. Every decode is compared with the input. Target (issue): the coder takes at
most 10% of the time. On CPU compare ratios, not absolute kB/s. Writes benchmarks/results/lm_coding_<device>.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from research import hardware, log, sources  # noqa: E402
from research.coding import lm  # noqa: E402
from research.data import corpora, dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "runs/demo"))
    p.add_argument("--bytes", type=int, default=8192)
    p.add_argument("--batch-sizes", default="1,4,16,64")
    args = p.parse_args(argv)
    if not sources.is_run(args.model):
        sys.exit(f"{args.model} is not a trained run: run `make demo` first (or pass --model)")
    m = sources.load(args.model)
    run = m.run_config
    data = dataset.split_text(corpora.load(run.data.corpus).text, run.data.val_fraction)[1].encode()[: args.bytes]
    rows = []
    for b in (int(x) for x in args.batch_sizes.split(",")):
        lm.encode(data[:256], m, batch_size=b)  # compile the step shapes first
        blob, enc = lm.encode(data, m, batch_size=b)
        out, dec = lm.decode(blob, m)
        assert out == data
        row = dict(
            batch_size=b,
            bits_per_byte=enc["bits_per_byte"],
            encode_kb_per_s=enc["kb_per_s"],
            decode_kb_per_s=dec["kb_per_s"],
            encode_coder_share=enc["coder_seconds"] / enc["seconds"],
            decode_coder_share=dec["coder_seconds"] / dec["seconds"],
            encode_model_share=enc["model_seconds"] / enc["seconds"],
            encode_seconds=enc["seconds"],
            decode_seconds=dec["seconds"],
        )
        rows.append(row)
        print(
            f"batch {b:3d}: encode {row['encode_kb_per_s']:6.1f} kB/s, decode {row['decode_kb_per_s']:6.1f} kB/s, "
            f"coder {row['encode_coder_share']:.1%} / {row['decode_coder_share']:.1%} of the time, "
            f"{row['bits_per_byte']:.4f} bits/byte",
            flush=True,
        )
    out = Path(__file__).parent / "results" / f"lm_coding_{hardware.slug()}.json"
    log.write_json_atomic(
        out,
        dict(
            benchmark="coding data with the demo model: encode/decode throughput and the coder's share of the time",
            command="python " + " ".join(["benchmarks/lm_coding.py", *sys.argv[1:]]),
            devices=hardware.describe(),
            python=platform.python_version(),
            cpu_count=os.cpu_count(),
            load_average_at_start=os.getloadavg(),
            data=f"first {len(data)} bytes of {run.data.corpus} (validation split)",
            model=args.model,
            target="the coder takes at most 10% of the time",
            rows=rows,
        ),
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
