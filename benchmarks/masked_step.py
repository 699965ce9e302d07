"""Masked fine-tuning step time relative to the dense step, measured in the same run (target: at most 1.15x).

Usage:
    python benchmarks/masked_step.py [--sizes demo shakespeare-gpu] [--steps 30] [--rounds 3]

Both steps are `research.train.step.make_train_step` on the same model, batch and optimizer settings: the dense
step with plain AdamW, the masked one under a 50% magnitude mask (`transform.apply` in the loss) with AdamW wrapped
in `core.keep_masked`. Dense and masked runs alternate in `--rounds` rounds so that machine noise hits both; the
ratio is of the medians over all timed steps (each synchronised, after one compiling call). Writes
`benchmarks/results/masked_step_<device>.json`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections as mlc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

from research import models  # noqa: E402
from research.compress import core  # noqa: E402
from research.compress.prune import magnitude  # noqa: E402
from research.models import config as mc  # noqa: E402
from research.train import optim  # noqa: E402
from research.train import step as step_lib  # noqa: E402

SIZES = {
    "demo": (mc.gpt2_style(vocab_size=256, n_layer=4, n_head=4, d_model=128, max_seq_len=128, bias=False), 16, 128),
    "shakespeare-gpu": (
        mc.gpt2_style(vocab_size=256, n_layer=6, n_head=6, d_model=384, max_seq_len=256, bias=False),
        16,
        256,
    ),
}
TRAIN = dict(steps=1000, lr=1e-4, min_lr=1e-5, warmup_steps=0, weight_decay=0.1, b1=0.9, b2=0.99, grad_clip=1.0)


def case(name, steps, rounds):
    cfg, b, t = SIZES[name]
    graphdef, params = models.init(cfg)
    batch = {"inputs": jax.random.randint(jax.random.key(1), (b, t), 0, cfg.vocab_size)}
    batch["targets"] = jnp.roll(batch["inputs"], -1, axis=1)
    tx = optim.make(mlc.ConfigDict(TRAIN))
    transform = magnitude.magnitude(0.5)
    cstate = transform.init(params, jax.random.key(0), None)
    masked_tx = core.keep_masked(tx)
    dense_step = step_lib.make_train_step(graphdef, tx, seed=0, dropout=False)
    masked_step = step_lib.make_train_step(graphdef, masked_tx, seed=0, dropout=False, transform=transform)
    dense, masked = [], []
    for _ in range(rounds):
        state = step_lib.init_state(jax.tree.map(jnp.copy, params), tx)
        dense += common.timed_steps(dense_step, state, batch, steps)
        state = {
            **step_lib.init_state(jax.tree.map(jnp.copy, params), masked_tx),
            "compress": jax.tree.map(jnp.copy, cstate),
        }
        masked += common.timed_steps(masked_step, state, batch, steps)
    d, m = statistics.median(dense), statistics.median(masked)
    return dict(
        size=name,
        batch=b,
        seq_len=t,
        params=mc.count_params(cfg),
        dense_step_s=d,
        masked_step_s=m,
        ratio=m / d,
        target_ratio=1.15,
        timed_steps_each=len(dense),
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    results = []
    for name in args.sizes:
        r = case(name, args.steps, args.rounds)
        d, m = r["dense_step_s"] * 1e3, r["masked_step_s"] * 1e3
        print(f"{name}: dense {d:.1f} ms, masked {m:.1f} ms, ratio {r['ratio']:.3f}")
        results.append(r)
    result = dict(
        benchmark="masked fine-tuning step vs dense step (50% magnitude masks, AdamW, fp32)",
        **common.environment("masked_step"),
        results=results,
    )
    common.write("masked_step", result, common.RESULTS / f"masked_step_{jax.devices()[0].platform}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
