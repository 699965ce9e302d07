"""Vector quantization against the scalar codebook at about 2 bits per weight: error and packed size.

Usage:
    python benchmarks/vq_bits.py [--n 256] [--seed 0]

One N(0, 1) float32 kernel of shape (n, n) (`jax.random.normal(key(seed))`), each method with its defaults
otherwise, initialised with key 0: `vq(bits=8, dim=4)`, `vq(bits=4, dim=2)`, `vq(bits=4, dim=4, stages=2)` and the
scalar `codebook(bits=2)`, all per tensor. Reported: the relative squared error sum((W_eff - W)^2) / sum(W^2) and
the bits per weight of the packed leaf (`pack.pack` with the transform's exported record: its index streams and
tables, headers of the streams included, the file's header excluded), with the bytes of every section. The
Gaussian's rate-distortion bound at 2 bits per weight is 2^-4 = 0.0625. Writes
`benchmarks/results/vq_bits_<device>.json`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

from research.coding import container, pack  # noqa: E402
from research.compress import core  # noqa: E402
from research.compress.share import codebook, vq  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    w = jax.random.normal(jax.random.key(args.seed), (args.n, args.n))
    params = {"a": {"kernel": w}}
    methods = {
        "vq(bits=8, dim=4)": vq.vq(8, dim=4, where="a/kernel"),
        "vq(bits=4, dim=2)": vq.vq(4, dim=2, where="a/kernel"),
        "vq(bits=4, dim=4, stages=2)": vq.vq(4, dim=4, stages=2, where="a/kernel"),
        "codebook(bits=2)": codebook.codebook(2, where="a/kernel"),
    }
    rows = []
    for name, t in methods.items():
        t0 = time.perf_counter()
        state = t.init(params, jax.random.key(0), None)
        eff = jax.tree.map(np.asarray, t.apply(params, state))
        seconds = time.perf_counter() - t0
        err = float(np.sum((eff["a"]["kernel"] - np.asarray(w)) ** 2) / np.sum(np.asarray(w) ** 2))
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "m.zlm"
            pack.pack(eff, out, meta={}, exported=core.export(t, params, state))
            leaf = container.Reader(out).leaves[0]
        sections = {k: v["length"] for k, v in leaf["sections"].items()}
        bpw = 8 * sum(sections.values()) / w.size
        rows.append(dict(method=name, kind=leaf["kind"], rel_sq_err=err, bits_per_weight=bpw, section_bytes=sections))
        rows[-1]["fit_seconds_with_compile"] = seconds
        print(f"{name:30s} {leaf['kind']:8s} rel. sq. error {err:.4f}  {bpw:.3f} bits/weight  {sections}")
    result = dict(common.environment("vq_bits"), shape=[args.n, args.n], seed=args.seed, rows=rows)
    common.write("vq_bits", result, args.out)
    return result


if __name__ == "__main__":
    main()
