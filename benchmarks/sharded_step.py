"""Train-step and fine-tune-step throughput on 1, 2, 4 and 8 forced CPU devices (ratios only on CPU).

    python benchmarks/sharded_step.py [--steps 10] [--devices 1,2,4,8]

Each device count runs in its own process (`jax_num_cpu_devices` is fixed at start-up) on the demo model shape,
batch 16 x 128 split over the mesh's data axis (rules "replicated"): the dense step and the fine-tune step under
magnitude 50% (masks in the state, `keep_masked`) and under 4-bit per-channel QAT (fake quantization with
min/max scales, straight-through), each `train.step.make_train_step` with the trainer's shardings
(`fit.state_shardings`). Forced CPU devices share the machine's cores: one device leaves part of them idle (the
2-core machine runs 8 devices' step in 0.56x the 1-device time), so the ratios mix that parallelism with the
sharding overhead (collectives, partitioned programs); masked and fake-quant vs dense on the same device count
is the clean comparison. The
median step time per configuration (the best of `--rounds` alternating rounds) is reported relative to the dense
1-device step of the same run.
On a GPU (`--shape 124m --dtype bfloat16 --devices 1[,2,...]`: GPT-2 124M, batch 16 x 1024, one process per
device count over the real devices) the same script reports absolute tokens/s and MFU (PaLM's FLOPs per token,
`models.config.flops_per_token`, over `hardware.peak_flops`) of the dense, masked and fake-quant steps, and of the
dense step once more with cuDNN's fused flash attention in place of the default (XLA's, which materialises the
(B, H, T, T) scores; a candidate for the low MFU measured on the H200), or why cuDNN refused it. Writes
benchmarks/results/sharded_step[_124m]_<device>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# --shape name -> (gpt2_style arguments, batch size, sequence length)
SHAPES = {
    "demo": (dict(vocab_size=256, n_layer=4, n_head=4, d_model=128, max_seq_len=128, bias=False), 16, 128),
    "124m": (dict(vocab_size=50304, n_layer=12, n_head=12, d_model=768, max_seq_len=1024), 16, 1024),
}


@contextlib.contextmanager
def _cudnn_attention():
    """Inside, the model's training attention calls `jax.nn.dot_product_attention` with implementation="cudnn"
    (fused flash attention) instead of the default, which is XLA's unfused one; a step traced inside keeps it.
    Measures what fused attention would give before the model grows an option for it."""
    import jax

    from research.models import transformer

    plain = transformer.causal_attention

    def fused(q, k, v, dropout=0.0, rng=None, window=None):
        assert (rng is None or dropout == 0.0) and window is None, "the benchmark's model has neither"
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    transformer.causal_attention = fused
    try:
        yield
    finally:
        transformer.causal_attention = plain


def _child(devices: int, steps: int, shape: str, dtype: str, rounds: int) -> dict:
    import jax

    jax.config.update("jax_num_cpu_devices", devices)  # the CPU backend's only; a GPU run uses its real devices
    import common
    import jax.numpy as jnp
    import ml_collections as mlc
    import numpy as np

    from research import hardware, models
    from research.compress import core
    from research.compress.prune import magnitude
    from research.compress.quant import qat
    from research.models import config as mc
    from research.parallel import sharding
    from research.train import fit, optim
    from research.train import step as step_lib

    kwargs, bsz, seq = SHAPES[shape]
    cfg = mc.gpt2_style(**kwargs, dtype=dtype)
    graphdef, params = models.init(cfg, 0)
    t = mlc.ConfigDict(dict(steps=100, lr=1e-3, min_lr=1e-4, warmup_steps=0, weight_decay=0.0, b1=0.9, b2=0.99))
    t.grad_clip = 1.0
    mesh = sharding.make_mesh(devices, 1)
    batch_sh = sharding.batch_sharding(mesh, ("data",))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (bsz, seq + 1)).astype(np.int32)
    batch = {k: jax.device_put(v, batch_sh) for k, v in (("inputs", tokens[:, :-1]), ("targets", tokens[:, 1:]))}
    runs = {}
    for name, transform in (
        ("dense", None),
        ("masked", magnitude.magnitude(0.5)),
        ("fake_quant", qat.qat(bits=4, granularity="channel")),
    ):
        tx = optim.make(t) if transform is None else core.keep_masked(optim.make(t))
        cstate = None if transform is None else transform.init(params, jax.random.key(0), None)
        state = fit.new_state(params, tx, cstate)
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), state)
        sh = fit.state_shardings(abstract, abstract["params"], "replicated", mesh)
        step = step_lib.make_train_step(
            graphdef, tx, seed=0, dropout=False, state_shardings=sh, batch_sharding=batch_sh, transform=transform
        )
        runs[name] = (step, state, sh)
    out = {}
    if jax.default_backend() == "gpu":  # the dense step again with cuDNN's fused attention (traced under `fused`)
        runs["dense_cudnn_attention"] = (
            step_lib.make_train_step(
                graphdef, optim.make(t), seed=0, dropout=False, state_shardings=runs["dense"][2],
                batch_sharding=batch_sh, transform=None,
            ),
            *runs["dense"][1:],
        )  # fmt: skip
    # Rounds alternate the configurations; each keeps its best round's median (the least disturbed on a shared
    # machine), so a burst of load on one of them does not bias the ratios.
    for _ in range(rounds):
        for name, (step, state, sh) in list(runs.items()):
            try:
                with _cudnn_attention() if name == "dense_cudnn_attention" else contextlib.nullcontext():
                    median = statistics.median(common.timed_steps(step, fit.place(state, sh), batch, steps))
            except Exception as e:  # cuDNN refused the shape or dtype: say so, keep the other configurations
                if name != "dense_cudnn_attention":
                    raise
                out[f"{name}_error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
                del runs[name]
                continue
            out[name] = min(out.get(name, median), median)
    out["tokens_per_step"] = bsz * seq
    out["flops_per_token"] = mc.flops_per_token(cfg, seq)
    out["peak_flops"] = hardware.peak_flops(dtype)  # all devices together; None on CPU
    out["device"] = hardware.describe()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per round and configuration")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; each configuration keeps its best")
    p.add_argument("--devices", default="1,2,4,8")
    p.add_argument("--shape", choices=sorted(SHAPES), default="demo", help="demo, or GPT-2 124M (for a GPU)")
    p.add_argument("--dtype", default="float32", help="compute dtype (bfloat16 on a GPU for MFU)")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(_child(args.child, args.steps, args.shape, args.dtype, args.rounds)))
        return
    import common

    load = os.getloadavg()
    rows = {}
    for n in [int(x) for x in args.devices.split(",")]:
        r = subprocess.run(
            [sys.executable, __file__, "--child", str(n), "--steps", str(args.steps), "--shape", args.shape,
             "--dtype", args.dtype, "--rounds", str(args.rounds)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        rows[n] = json.loads(r.stdout.strip().splitlines()[-1])
        r = rows[n]
        fused = r.get("dense_cudnn_attention")
        print(
            f"{n} device(s): dense {r['dense'] * 1e3:.1f} ms, masked {r['masked'] * 1e3:.1f} ms, "
            f"fake-quant {r['fake_quant'] * 1e3:.1f} ms"
            + (f", dense with cuDNN attention {fused * 1e3:.1f} ms" if fused else "")
            + (
                f" (cuDNN attention failed: {r['dense_cudnn_attention_error']})"
                if "dense_cudnn_attention_error" in r
                else ""
            ),
            flush=True,
        )
    base = rows[min(rows)]["dense"]
    result = {
        **common.environment("sharded_step", load),
        "model": f"{args.shape} shape {SHAPES[args.shape][0]}, batch {SHAPES[args.shape][1]} x "
        f"{SHAPES[args.shape][2]}, {args.dtype}, rules replicated",
        "device": rows[max(rows)]["device"],
        "baseline": f"dense step on {min(rows)} device(s)",
        "rows": [
            {
                "devices": n,
                "dense_vs_baseline": r["dense"] / base,
                "masked_vs_baseline": r["masked"] / base,
                "masked_vs_dense": r["masked"] / r["dense"],
                "fake_quant_vs_baseline": r["fake_quant"] / base,
                "fake_quant_vs_dense": r["fake_quant"] / r["dense"],
                "tokens_per_second_dense": r["tokens_per_step"] / r["dense"],
                **{
                    f"mfu_{k}": r["tokens_per_step"] / r[k] * r["flops_per_token"] / r["peak_flops"]
                    for k in ("dense", "masked", "fake_quant", "dense_cudnn_attention")
                    if r["peak_flops"] and k in r
                },
                # GPU only: the dense step with cuDNN's fused attention instead of XLA's (or why it failed)
                **(
                    {"cudnn_attention_vs_dense": r["dense_cudnn_attention"] / r["dense"]}
                    if "dense_cudnn_attention" in r
                    else {}
                ),
                **{k: r[k] for k in ("dense_cudnn_attention_error",) if k in r},
            }
            for n, r in sorted(rows.items())
        ],
    }
    common.write("sharded_step" if args.shape == "demo" else f"sharded_step_{args.shape}", result)


if __name__ == "__main__":
    main()
