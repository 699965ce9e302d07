"""Train-step throughput: tokens/s and model FLOPs utilisation of the jitted step, per model size and dtype.

Usage:
    python benchmarks/train_step_throughput.py                 # the sizes that fit the device (CPU: small ones)
    python benchmarks/train_step_throughput.py --sizes demo gpt2-small --dtypes float32 bfloat16 --steps 20

Times the same `research.train.step.make_train_step` the trainer uses, on random tokens, after one compiling call:
the median of `--steps` timed steps (each synchronised). Writes `benchmarks/results/train_step_throughput_<device>.json`
with, per case: step time, tokens/s, FLOPs per token (PaLM convention, research.models.config.flops_per_token),
achieved TFLOP/s and MFU where the device's peak is known (research.hardware). On CPU the absolute numbers only
describe that machine; compare cases within one file.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import jax

from research import config, files, hardware, models
from research.models import config as mc
from research.train import optim
from research.train import step as step_lib

# name -> (model config, batch size, sequence length)
SIZES = {
    "demo": (mc.gpt2_style(vocab_size=256, n_layer=4, n_head=4, d_model=128, max_seq_len=128, bias=False), 16, 128),
    "shakespeare-gpu": (
        mc.gpt2_style(vocab_size=256, n_layer=6, n_head=6, d_model=384, max_seq_len=256, bias=False),
        64,
        256,
    ),
    "gpt2-small": (mc.gpt2_style(vocab_size=50304, n_layer=12, n_head=12, d_model=768, max_seq_len=1024), 16, 1024),
    "llama-160m": (
        mc.llama_style(vocab_size=32000, n_layer=12, n_head=12, n_kv_head=4, d_model=768, max_seq_len=1024),
        16,
        1024,
    ),
}
CPU_SIZES = ["demo", "shakespeare-gpu"]


def bench(cfg: mc.ModelConfig, batch: int, seq: int, steps: int) -> dict:
    t = config.base_config().train
    tx = optim.make(t)
    graphdef, params = models.init(cfg)
    state = step_lib.init_state(params, tx)
    train_step = step_lib.make_train_step(graphdef, tx, seed=0, dropout=False)
    x = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, cfg.vocab_size)
    b = {"inputs": x[:, :-1], "targets": x[:, 1:]}
    t0 = time.perf_counter()
    state, m = train_step(state, b)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = train_step(state, b)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tps = batch * seq / step_s
    flops = mc.flops_per_token(cfg, seq)
    peak = hardware.peak_flops(cfg.dtype)
    return {
        "params": mc.count_params(cfg),
        "batch": batch,
        "seq_len": seq,
        "dtype": cfg.dtype,
        "compile_seconds": compile_s,
        "step_seconds_median": step_s,
        "step_seconds_min": min(times),
        "tokens_per_second": tps,
        "flops_per_token": flops,
        "achieved_tflops": tps * flops / 1e12,
        "mfu": tps * flops / peak if peak else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    on_cpu = jax.devices()[0].platform == "cpu"
    p.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=CPU_SIZES if on_cpu else list(SIZES))
    p.add_argument(
        "--dtypes",
        nargs="+",
        choices=["float32", "bfloat16"],
        default=["float32"] if on_cpu else ["float32", "bfloat16"],
    )
    p.add_argument("--steps", type=int, default=10 if on_cpu else 30)
    p.add_argument("--out", help="result file (default benchmarks/results/train_step_throughput_<device>.json)")
    args = p.parse_args()

    cases = []
    for name in args.sizes:
        cfg, batch, seq = SIZES[name]
        for dtype in args.dtypes:
            r = {"size": name, **bench(cfg.replace(dtype=dtype), batch, seq, args.steps)}
            cases.append(r)
            mfu = f", MFU {r['mfu']:.1%}" if r["mfu"] is not None else ""
            print(
                f"{name:16s} {dtype:9s} {r['tokens_per_second']:12,.0f} tokens/s  "
                f"{r['step_seconds_median'] * 1e3:8.1f} ms/step{mfu}",
                flush=True,
            )
    result = {
        "benchmark": "train_step_throughput",
        "command": "python " + " ".join(sys.argv),
        "device": hardware.describe(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "default_matmul_precision": str(jax.config.jax_default_matmul_precision),
        "cases": cases,
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"train_step_throughput_{hardware.slug()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
