"""Packing benchmarks: bit-exact float coding against zstd / gzip / zipnn on the same bytes, and pack / unpack
throughput on a ~124M-parameter model, with every stream's packed size against its entropy bound.

Usage:
    python benchmarks/pack_bench.py [--params-model gpt2] [--skip-throughput]
    pip install zipnn   # optional peer (needs torch; `make test`'s venv has the CPU build)

Part 1, ratio (compressed bytes / original bytes, lower is better), per tensor set, in fp32 and in bf16
(round-to-nearest-even casts of the same weights):
  - ours: `coding.floats.encode` leaf by leaf (every table and length counted);
  - zstd level 19 and 22 (`zstandard`), gzip level 9 (Python's zlib), on the concatenated raw bytes;
  - zipnn (`zipnn.ZipNN(bytearray_dtype=...)` on the same bytes) where it imports; its output is checked to
    decompress to the input.
Tensor sets: the trained Tiny Shakespeare model (runs/shakespeare_char_cpu, 0.8M parameters, if present), the
trained demo model (runs/demo, if present) and a GPT-2-small-shaped model at its random init (N(0, 0.02) kernels,
124M parameters; zstd at levels 19 and 22 take minutes on it): no trained LLM checkpoint can be downloaded here,
so the anchor (ZipNN / DFloat11: 67-70% of bf16 for LLM weights) is compared on these, not on a real LLM.

Part 2, throughput on the 124M model (CPU; 2 cores on the dev machine): `pack.pack` and `pack.unpack` (every
checksum verified) of (a) the dense fp32 model and (b) the same model with the block kernels pruned to 50%
(magnitude) and quantized to 4 bits per output channel (RTN), in MB/s of packed data and of the fp32 model. Packing
tries every representation that applies and verifies each, so it is slower than unpacking by design.

Writes benchmarks/results/pack_<device>.json.
"""

from __future__ import annotations

import argparse
import gzip
import sys
import tempfile
import time
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

from research import files, hardware, models, sources, tree  # noqa: E402
from research.coding import floats, pack  # noqa: E402
from research.models import config as model_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def peers(raw: bytes, dtype: str) -> dict:
    import zstandard

    out = {}
    for level in (19, 22):
        t = time.perf_counter()
        c = zstandard.ZstdCompressor(level=level).compress(raw)
        out[f"zstd-{level}"] = dict(ratio=len(c) / len(raw), seconds=time.perf_counter() - t)
    t = time.perf_counter()
    out["gzip-9"] = dict(ratio=len(gzip.compress(raw, 9)) / len(raw), seconds=time.perf_counter() - t)
    try:
        import zipnn

        z = zipnn.ZipNN(input_format="byte", bytearray_dtype=dtype)
        t = time.perf_counter()
        c = z.compress(raw)
        seconds = time.perf_counter() - t
        ok = bytes(z.decompress(c)) == raw
        out["zipnn"] = dict(ratio=len(c) / len(raw), seconds=seconds, round_trip=ok)
    except ImportError:
        out["zipnn"] = "not installed (pip install zipnn)"
    return out


def ratio_case(name: str, leaves: dict) -> dict:
    res = {}
    for dtype, cast in (("float32", np.float32), ("bfloat16", ml_dtypes.bfloat16)):
        arrays = [np.asarray(x, np.float32).astype(cast) for x in leaves.values()]
        raw = b"".join(a.tobytes() for a in arrays)
        t = time.perf_counter()
        ours = sum(len(floats.encode(a)) for a in arrays)
        seconds = time.perf_counter() - t
        row = dict(
            values=sum(a.size for a in arrays), bytes=len(raw), ours=dict(ratio=ours / len(raw), seconds=seconds)
        )
        row.update(peers(raw, dtype))
        best = min((v["ratio"], k) for k, v in row.items() if isinstance(v, dict) and k != "ours")
        row["best_peer"] = best[1]
        row["ours_at_most_best_peer"] = row["ours"]["ratio"] <= best[0]
        res[dtype] = row
        print(
            f"{name:28s} {dtype:9s} ours {row['ours']['ratio']:.4f}  "
            + "  ".join(f"{k} {v['ratio']:.4f}" for k, v in row.items() if isinstance(v, dict) and k != "ours"),
            flush=True,
        )
    return res


def gpt2_small():
    cfg = model_config.gpt2_style(vocab_size=50257, n_layer=12, n_head=12, d_model=768, max_seq_len=1024)
    _, params = models.init(cfg, seed=0)
    return cfg, jax.tree.map(np.asarray, params)


def compressed(params):
    from research.compress import core
    from research.compress.prune import magnitude
    from research.compress.quant import rtn

    t = core.chain(magnitude.magnitude(0.5), rtn.rtn(4, granularity="channel"))
    state = t.init(params, jax.random.key(0), None)
    eff = jax.tree.map(np.asarray, t.apply(params, state))
    from research import codes

    return eff, codes.to_numpy(core.export(t, params, state))


def throughput(name: str, params, exported) -> dict:
    n = sum(np.size(x) for x in tree.flatten(params).values())
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.zlm"
        t = time.perf_counter()
        rep = pack.pack(params, path, meta={}, exported=exported, progress=False)
        t_pack = time.perf_counter() - t
        t = time.perf_counter()
        _, back = pack.unpack(path)
        t_unpack = time.perf_counter() - t
    same = all(
        np.array_equal(np.asarray(a).view(np.uint32), b.view(np.uint32))
        for a, b in zip(tree.flatten(params).values(), tree.flatten(back).values())
    )
    mb, fp32_mb = rep["file_bytes"] / 1e6, 4 * n / 1e6
    out = dict(
        params=int(n),
        packed_bytes=rep["file_bytes"],
        bits_per_weight=rep["bits_per_weight"],
        bound_bits_per_weight=rep["bound_bits_per_weight"],
        ratio_vs_fp32=rep["ratio_vs_fp32"],
        ratio_vs_bf16=rep["ratio_vs_bf16"],
        pack_seconds=t_pack,
        unpack_seconds=t_unpack,
        pack_mb_per_s_packed=mb / t_pack,
        unpack_mb_per_s_packed=mb / t_unpack,
        pack_mb_per_s_fp32=fp32_mb / t_pack,
        unpack_mb_per_s_fp32=fp32_mb / t_unpack,
        bit_identical=same,
        kinds=rep["kinds"],
        sections={
            k: dict(v, bytes_over_bound=v["bytes"] / max(v["bound_bits"] / 8, 1e-9)) for k, v in rep["sections"].items()
        },
    )
    print(
        f"{name}: {rep['file_bytes'] / 1e6:.1f} MB ({rep['bits_per_weight']:.3f} bits/weight, bound "
        f"{rep['bound_bits_per_weight']:.3f}), pack {t_pack:.1f} s ({out['pack_mb_per_s_fp32']:.1f} MB/s of fp32), "
        f"unpack {t_unpack:.1f} s ({out['unpack_mb_per_s_fp32']:.1f} MB/s of fp32), bit-identical {same}",
        flush=True,
    )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--skip-throughput", action="store_true")
    args = p.parse_args(argv)
    results = {"ratio": {}, "throughput": {}}
    for name, path in (
        ("shakespeare_char_cpu (trained)", ROOT / "runs/shakespeare_char_cpu"),
        ("demo (trained)", ROOT / "runs/demo"),
    ):
        if sources.is_run(path):
            results["ratio"][name] = ratio_case(name, tree.flatten(sources.load(str(path)).params))
        else:
            results["ratio"][name] = f"skipped: {path} not found (train it first)"
    cfg, params = gpt2_small()
    results["ratio"]["gpt2-small shape (random init)"] = ratio_case(
        "gpt2-small shape (random init)", tree.flatten(params)
    )
    if not args.skip_throughput:
        results["throughput"]["dense fp32"] = throughput("dense fp32", params, {})
        eff, exported = compressed(params)
        del params
        results["throughput"]["magnitude 50% + rtn 4-bit channel"] = throughput(
            "magnitude 50% + rtn 4-bit", eff, exported
        )
    out = Path(__file__).parent / "results" / f"pack_{hardware.slug()}.json"
    files.write_json(
        out,
        dict(
            benchmark="bit-exact float coding vs zstd/gzip/zipnn; pack/unpack throughput and size vs entropy bound",
            **common.environment("pack_bench"),
            target="bit-exact float size at most the best peer's on the same weights",
            model=cfg.to_dict(),
            results=results,
        ),
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
