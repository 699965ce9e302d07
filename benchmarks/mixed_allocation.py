"""Cost of mixed precision (`research/compress/mixed.py`): the sensitivity pass and the allocation, and how they
grow with the number of leaves.

    python benchmarks/mixed_allocation.py [--layers 1,2,4,8] [--ilp 100,1000,10000]

Part 1, whole init: GPT-2-style models of 1..8 blocks (d_model 64, 6 kernels per block), options RTN 2/3/4/8 bits
per channel on every block kernel, 16 calibration windows of 64 tokens; per model the seconds of the measuring pass
(options initialised, every (leaf, option) packed and its sensitivity measured) and of the allocation, for
`sensitivity="loss"` (one calibration forward pass per leaf and option) and `"fisher"` (one backward pass in
all), each also as a ratio to one calibration forward pass measured in the same run (the baseline: CPU times are
noisy, ratios less so). Part 2, the allocation alone: random (L leaves x 6 options) knapsacks solved by
`mixed.allocate` (scipy's HiGHS), L up to 10,000 (SmolLM2 has 211 leaves, an 8B Llama 225).

Writes benchmarks/results/mixed_allocation_<device>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

from research import models  # noqa: E402
from research.compress import calib, mixed, registry  # noqa: E402
from research.models import config as model_config  # noqa: E402
from research.models import loss as loss_lib  # noqa: E402


def _model(n_layer: int):
    cfg = model_config.gpt2_style(vocab_size=256, n_layer=n_layer, n_head=4, d_model=64, max_seq_len=64)
    graphdef, params = models.init(cfg)
    tokens = (np.arange(40000) * 7 % 251).astype(np.int32)
    return graphdef, params, calib.Calibration(graphdef, calib.sample(tokens, 16, 64, seed=0), batch_size=16)


def _forward_seconds(graphdef, params, data, repeats=5) -> float:
    fn = jax.jit(lambda p, b: loss_lib.loss_fn(p, graphdef, b))
    b = next(iter(data.batches()))
    batch = {"inputs": b[:, :-1], "targets": b[:, 1:]}
    fn(params, batch).block_until_ready()
    t = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(params, batch).block_until_ready()
        t.append(time.perf_counter() - t0)
    return float(np.median(t))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default="1,2,4,8")
    p.add_argument("--ilp", default="100,1000,10000")
    p.add_argument("--out")
    args = p.parse_args(argv)
    load = common.environment("mixed_allocation")
    options = [dict(method="rtn", bits=b, granularity="channel") for b in (2, 3, 4, 8)]
    inits = []
    for n in map(int, args.layers.split(",")):
        graphdef, params, data = _model(n)
        fwd = _forward_seconds(graphdef, params, data)
        for sens in ("loss", "fisher"):
            t = registry.make("mixed", options=options, budget_bits_per_weight=12.0, sensitivity=sens)
            t0 = time.perf_counter()
            state = t.init(params, jax.random.key(0), data)
            total = time.perf_counter() - t0
            measure, allocate = (float(x) for x in np.asarray(state["seconds"]))
            row = dict(
                layers=n,
                leaves=6 * n,
                options=len(options),
                sensitivity=sens,
                seconds_total=total,
                seconds_measure=measure,
                seconds_allocate=allocate,
                forward_seconds=fwd,
                measure_in_forwards=measure / fwd,
                allocate_in_forwards=allocate / fwd,
            )
            inits.append(row)
            print(
                f"{n} layers ({6 * n} leaves), {sens}: measure {measure:.2f} s ({measure / fwd:.0f} forwards), "
                f"allocate {allocate:.3f} s",
                flush=True,
            )
    ilp = []
    rng = np.random.default_rng(0)
    for n_l in map(int, args.ilp.split(",")):
        sizes = rng.integers(1000, 100000, (n_l, 6))
        sizes.sort(axis=1)
        sens = np.sort(rng.random((n_l, 6)), axis=1)[:, ::-1].copy()  # more bytes, less loss
        budget = float(sizes[:, 2].sum())
        t0 = time.perf_counter()
        choice = mixed.allocate(sens, sizes, budget, [str(i) for i in range(n_l)], budget)
        sec = time.perf_counter() - t0
        ilp.append(
            dict(
                leaves=n_l, options=6, seconds=sec, bytes_used=float(sizes[np.arange(n_l), choice].sum()), budget=budget
            )
        )
        print(f"allocate {n_l} x 6: {sec:.3f} s", flush=True)
    result = dict(
        benchmark="mixed precision: sensitivity pass and allocation time vs number of leaves",
        protocol="GPT-2-style d_model 64 models of 1..8 blocks, RTN 2/3/4/8-bit options on the 6 kernels per block, "
        "16 x 64 calibration tokens; ratios against one calibration forward pass in the same run (CPU: compare "
        "ratios); ILP on random monotone (L x 6) instances with the budget at the third option's total",
        init=inits,
        allocation_alone=ilp,
        **load,
    )
    common.write("mixed_allocation", result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
