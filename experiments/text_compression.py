"""Language modeling is compression, measured: held-out text coded with the Tiny Shakespeare model (dense and
compressed) against gzip, bz2, xz and zstd on the same bytes, with the model's packed size counted.

    python experiments/text_compression.py                       # ~15 min on 2 CPU cores
    python experiments/text_compression.py --wikitext-bytes 0    # Tiny Shakespeare only

Models: the run of experiments/configs/shakespeare_char_cpu.py (trained into runs/shakespeare_char_cpu if
missing), dense, and the compressed models of three configs (made under runs/text-<name> if missing): SparseGPT 50%
-> 200 steps -> 4-bit GPTQ groups of 32 (prune_finetune_quantize.py), magnitude 50% -> 200 steps -> 4-bit
codebooks with trained centroids (deep_compression.py), W8A8 (w8a8.py); plus one-shot 4-bit and 3-bit GPTQ (groups
of 32). Every model is packed (`ziplm pack`'s format) and the coder runs on the packed file, so the model bytes are
the file the decoder needs.

Data: the Tiny Shakespeare validation split (the last 10% of characters, never trained on) and the first
--wikitext-bytes bytes of WikiText-2 test (raw; out of domain for a Shakespeare model). Coding: chunks of the
model's context (64 bytes), 64 parallel streams; every coded file is decoded and compared with the input.

The table per data set: bits per byte of the coded data, model bytes, total description length = model bytes +
coded data bytes (the classic codecs need no model), and for the model coders the ideal -log2 P(x) and the coder's
overhead over it. Writes experiments/results/text_compression.json and .png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from research import config as config_lib  # noqa: E402
from research import sources  # noqa: E402
from research.coding import artifact, compare  # noqa: E402
from research.compress import pipeline  # noqa: E402
from research.data import corpora, dataset  # noqa: E402
from research.train import loop  # noqa: E402
from tests.helpers import SHAKESPEARE, WIKITEXT_RAW  # noqa: E402

GPTQ = dict(method="gptq", granularity="group", group_size=32, symmetric=True, group_fit="sweep")
# name -> (config file, compress list replacing the file's, or None)
CONFIGS = {
    "sparsegpt50+ft+gptq4g32": ("prune_finetune_quantize.py", None),
    "magnitude50+ft+codebook4": ("deep_compression.py", None),
    "w8a8": ("w8a8.py", None),
    "gptq4g32": ("w8a8.py", [dict(GPTQ, bits=4)]),
    "gptq3g32": ("w8a8.py", [dict(GPTQ, bits=3)]),
}


def models(base: Path) -> dict[str, Path]:
    """{name: packed model file} for the dense model and every config, made when missing."""
    if not sources.is_run(base):
        print(f"training {base} (experiments/configs/shakespeare_char_cpu.py)", flush=True)
        loop.train(config_lib.load(str(ROOT / "experiments/configs/shakespeare_char_cpu.py")), base)
    out = {}
    dense = base.parent / "text-dense.zlm"
    if not dense.exists():
        artifact.pack_model(sources.load(base), dense)
    out["dense"] = dense
    for name, (cfg_file, compress) in CONFIGS.items():
        workdir = base.parent / f"text-{name}"
        if not (workdir / "model.zlm").exists():
            print(f"compressing: {name}", flush=True)
            cfg = config_lib.load(str(ROOT / "experiments/configs" / cfg_file))
            cfg.model = str(base)
            if compress is not None:
                cfg.compress = compress
            pipeline.run(cfg, workdir, overwrite=True)
        out[name] = workdir / "model.zlm"
    return out


def datasets(wikitext_bytes: int) -> dict[str, bytes]:
    text = SHAKESPEARE.read_text()
    out = {"tinyshakespeare val (111,540 bytes)": dataset.split_text(text, 0.1)[1].encode()}
    if wikitext_bytes and WIKITEXT_RAW.exists():
        data = corpora.load(f"wikitext:{WIKITEXT_RAW}").text.encode()[:wikitext_bytes]
        out[f"wikitext-2 test, first {len(data):,} bytes"] = data
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "runs/shakespeare_char_cpu"))
    p.add_argument("--wikitext-bytes", type=int, default=262_144)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default=str(ROOT / "experiments/results/text_compression.json"))
    args = p.parse_args(argv)
    t_start = time.time()
    files = models(Path(args.model).resolve())
    results = {}
    for dname, data in datasets(args.wikitext_bytes).items():
        print(f"{dname}:", flush=True)
        rs = compare.rows(data, files, batch_size=args.batch_size)
        results[dname] = dict(bytes=len(data), rows=rs, smallest_total=rs[0]["coder"])
    out = Path(args.out)
    final = dict(
        experiment="text compression with the model vs the classics, total description length",
        command="python " + " ".join(["experiments/text_compression.py", *sys.argv[1:]]),
        protocol="chunks of the model's context (64 bytes) from a start byte (10); 64 parallel streams; range coder; "
        "model bytes = the packed model file; total = model bytes + coded data bytes",
        results=results,
        seconds=time.time() - t_start,
    )
    files.write_json(out, final)
    compare.plot({k: v["rows"] for k, v in results.items()}, out.with_suffix(".png"))
    for dname, r in results.items():
        print(f"\n{dname}\n{compare.table(r['rows'])}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
