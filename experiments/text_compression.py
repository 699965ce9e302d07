"""Language modeling is compression, measured: held-out text coded with the Tiny Shakespeare model (dense and
compressed) against gzip, bz2, xz and zstd on the same bytes, with the model's packed size counted.

    python experiments/text_compression.py                       # ~15 min on 2 CPU cores

Runs two sweeps, cached under runs/sweeps/: experiments/sweeps/text_models.py (the compressed models: SparseGPT 50%
-> 200 steps -> 4-bit GPTQ g32, magnitude 50% -> 200 steps -> 4-bit codebooks, W8A8, one-shot 4- and 3-bit GPTQ
g32) and experiments/sweeps/text_coding.py (every model x data set through `ziplm encode`, each coded file decoded
and compared). Data: the Tiny Shakespeare validation split and the first 262,144 bytes of WikiText-2 raw test.

The table per data set: bits per byte of the coded data, model bytes (the packed file a decoder needs: model.zlm,
and the dense run packed by `ziplm pack`'s format), total description length = model bytes + coded data bytes (the
classic codecs need no model), and for the model coders the ideal -log2 P(x) and the coder's overhead over it.
Writes experiments/results/text_compression.json and .png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.sweeps import study, text_coding  # noqa: E402
from research import files, sources  # noqa: E402
from research.coding import artifact, classic, compare  # noqa: E402
from research.sweep import runner  # noqa: E402

MODELS = str(ROOT / "experiments" / "sweeps" / "text_models.py")
CODING = str(ROOT / "experiments" / "sweeps" / "text_coding.py")


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    t_start = time.time()
    status = study.run_sweep(MODELS)[0] or runner.run(CODING, [])  # the study model trained first where missing
    dense = text_coding.DATA / "dense.zlm"
    if not dense.exists():
        artifact.pack_model(sources.load(str(study.model())), dense)
    results = {}
    for r in runner.finished(CODING):
        data = Path(r["overrides"]["input"]).read_bytes()
        name = {
            "shakespeare_val": f"tinyshakespeare val ({len(data):,} bytes)",
            "wikitext2_test": f"wikitext-2 test, first {len(data):,} bytes",
        }[r["label0"]]
        if name not in results:
            classics = [
                dict(coder=c, model_bytes=0, data_bytes=n, bits_per_byte=8 * n / len(data), total_bytes=n)
                for c, n in classic.compress_all(data).items()
            ]
            results[name] = dict(bytes=len(data), rows=classics)
        rep = r["result"]
        model = dense if r["label1"] == "dense" else Path(r["overrides"]["model"])
        model_bytes = model.stat().st_size
        results[name]["rows"].append(
            dict(
                coder=f"model: {r['label1']}",
                model_bytes=model_bytes,
                data_bytes=rep["coded_bytes"],
                bits_per_byte=rep["bits_per_byte"],
                ideal_bits_per_byte=rep["ideal_bits_per_byte"],
                overhead_bytes=rep["overhead_bytes"],
                total_bytes=model_bytes + rep["coded_bytes"],
                encode_kb_per_s=rep["kb_per_s"],
                decoded=rep["roundtrip"],
                coder_share=rep["coder_seconds"] / max(rep["seconds"], 1e-9),
            )
        )
    for r in results.values():
        r["rows"].sort(key=lambda row: row["total_bytes"])
        r["smallest_total"] = r["rows"][0]["coder"]
    out = ROOT / "experiments" / "results" / "text_compression.json"
    final = dict(
        experiment="text compression with the model vs the classics, total description length",
        command="python experiments/text_compression.py (= ziplm sweep experiments/sweeps/text_models.py, then "
        "experiments/sweeps/text_coding.py)",
        protocol="chunks of the model's context (64 bytes) from a start byte (10); 64 parallel streams; range coder; "
        "every coded file decoded and compared; model bytes = the packed model file; total = model bytes + coded "
        "data bytes",
        results=results,
        seconds=time.time() - t_start,
    )
    files.write_json(out, final)
    compare.plot({k: v["rows"] for k, v in results.items()}, out.with_suffix(".png"))
    for dname, r in results.items():
        print(f"\n{dname}\n{compare.table(r['rows'])}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
