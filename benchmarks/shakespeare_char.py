"""The reference task: nanoGPT's character-level Tiny Shakespeare, CPU or GPU setting.

Usage:
    python benchmarks/shakespeare_char.py cpu   # 4x128 baby GPT, 2000 steps; target val loss <= 1.88
    python benchmarks/shakespeare_char.py gpu   # 6x384, 5000 steps; nanoGPT reports 1.4697 on an A100

Trains the config `experiments/configs/shakespeare_char_<setting>.py` in a fresh run directory and writes
`benchmarks/results/shakespeare_char_<setting>_<device>.json`: the loss curve (train every 10 steps, validation
every 250), the final validation loss and bits per byte, wall time, tokens/s after compilation, and model FLOPs
utilisation where the device's peak is known, and the loss curve as a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax

from research import config, files, hardware, log, report
from research.train import loop

HERE = Path(__file__).resolve().parent

TARGETS = {"cpu": 1.88, "gpu": 1.4697}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("setting", choices=["cpu", "gpu"])
    p.add_argument("--steps", type=int, help="override the number of steps (for a quick check)")
    p.add_argument("--out", help="result file (default benchmarks/results/shakespeare_char_<setting>_<device>.json)")
    args = p.parse_args()

    cfg = config.load(str(HERE.parent / "experiments" / "configs" / f"shakespeare_char_{args.setting}.py"))
    if args.steps:
        cfg.train.steps = args.steps
    if jax.devices()[0].platform == "cpu":
        cfg.model.dtype = "float32"
    cfg.wandb.mode = "disabled"
    workdir = Path(tempfile.mkdtemp(prefix="ziplm-bench-")) / "run"
    t0 = time.time()
    summary = loop.train(cfg, workdir, progress=False)
    wall = time.time() - t0
    records = log.read_jsonl(workdir / "metrics.jsonl")
    device = hardware.describe()
    tps = summary["tokens_per_second"]
    result = {
        "benchmark": "shakespeare_char",
        "setting": args.setting,
        "command": "python " + " ".join(sys.argv),
        "device": device,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "config": cfg.to_dict(),
        "params": summary["params"],
        "steps": summary["steps"],
        "final_val_loss": summary["val"]["loss"],
        "final_val_bits_per_byte": summary["val"]["bits_per_byte"],
        "protocol": f"validation split (last 10% of characters), {summary['val']['protocol']}",
        "target_val_loss": TARGETS[args.setting],
        "meets_target": summary["val"]["loss"] <= TARGETS[args.setting],
        "wall_seconds": wall,
        "tokens_per_second": tps,
        "flops_per_token": summary["flops_per_token"],
        "mfu": summary["mfu"],
        "train_curve": [[r["step"], r["loss"]] for r in records if r["split"] == "train"],
        "val_curve": [[r["step"], r["loss"]] for r in records if r["split"] == "val"],
    }
    out = Path(args.out or HERE / "results" / f"shakespeare_char_{args.setting}_{hardware.slug()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(out, result)
    report.plot_losses(workdir, out.with_suffix(".png"))
    shutil.rmtree(workdir.parent, ignore_errors=True)
    print(
        json.dumps(
            {k: result[k] for k in ("final_val_loss", "meets_target", "wall_seconds", "tokens_per_second", "mfu")},
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
