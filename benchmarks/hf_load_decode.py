"""Hugging Face checkpoint load time and peak memory, and decode speed with and without the KV cache.

Usage:
    python benchmarks/hf_load_decode.py                       # GPT-2 small shape (124M parameters), random weights
    python benchmarks/hf_load_decode.py --size tiny --new 16  # a quick check

Writes a random-weight checkpoint of the chosen shape with `research.models.hf.export` (fp32 safetensors, no
download), then, each in a fresh subprocess so that peak memory is the load's own:
  - load:  `hf.load` wall time and the peak RSS during it, above the RSS before it (Linux VmHWM, reset first);
  - torch: transformers' `from_pretrained` on the same directory, when torch is installed (same machine, same run);
  - decode: `decode.generate` tokens/s (greedy, batch 1, after a compiling call) with the cache and without it
    (the whole sequence recomputed per token), for a `--prompt`-token prompt and `--new` new tokens.
Writes `benchmarks/results/hf_load_decode_<device>.json`. On CPU, compare the numbers within one file.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {
    "gpt2-small": dict(vocab_size=50257, n_layer=12, n_head=12, d_model=768, max_seq_len=1024),
    "tiny": dict(vocab_size=512, n_layer=2, n_head=2, d_model=64, max_seq_len=256),
}

# Peak memory of the measured call alone: Linux's VmHWM, reset just before it (ru_maxrss is inherited from the parent).
_MEM = """
import json, sys, time


def _mem(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024  # MiB


def _reset():
    open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from the current RSS
    return _mem("VmRSS")


def _report(seconds, base):
    peak = _mem("VmHWM")
    out = {"seconds": seconds, "peak_rss_mib": peak, "rss_before_mib": base, "peak_above_before_mib": peak - base}
    print(json.dumps(out))
"""

_LOAD = """
import jax, transformers
from research.models import hf
jax.devices()  # backend start-up is not part of loading
base = _reset()
t = time.perf_counter()
pre = hf.load(sys.argv[1])
jax.block_until_ready(pre.params)
_report(time.perf_counter() - t, base)
"""

_TORCH = """
import torch, transformers
base = _reset()
t = time.perf_counter()
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
_report(time.perf_counter() - t, base)
"""

_DECODE = """
import json, sys, time
import numpy as np
from research import models
from research.models import decode, hf
pre = hf.load(sys.argv[1])
graphdef, _ = models.abstract(pre.cfg)
prompt_len, new = int(sys.argv[2]), int(sys.argv[3])
prompt = np.random.default_rng(0).integers(0, pre.cfg.vocab_size, (1, prompt_len))
out = {}
for cached in (True, False):
    decode.generate(graphdef, pre.params, prompt, new, use_cache=cached)  # compile
    t = time.perf_counter()
    decode.generate(graphdef, pre.params, prompt, new, use_cache=cached)
    dt = time.perf_counter() - t
    out["with_cache" if cached else "without_cache"] = {"seconds": dt, "tokens_per_s": new / dt}
out["speedup"] = out["with_cache"]["tokens_per_s"] / out["without_cache"]["tokens_per_s"]
print(json.dumps(out))
"""


def _child(code: str, *args: str) -> dict:
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"benchmark step failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="gpt2-small")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--new", type=int, default=64, help="new tokens to decode")
    ap.add_argument("--out", help="output JSON (default benchmarks/results/hf_load_decode_<device>.json)")
    args = ap.parse_args()

    import jax

    from research import files, models
    from research.models import config as mc
    from research.models import hf

    cfg = mc.gpt2_style(**SIZES[args.size])
    device = jax.devices()[0].platform
    result = {
        "benchmark": "hf_load_decode",
        "size": args.size,
        "params": mc.count_params(cfg),
        "device": device,
        "device_kind": jax.devices()[0].device_kind,
        "machine": platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        t = time.perf_counter()
        hf.export(cfg, models.init(cfg, 0)[1], ckpt)
        result["export_seconds"] = time.perf_counter() - t
        result["checkpoint_mb"] = sum(p.stat().st_size for p in ckpt.iterdir()) / 2**20
        print(f"checkpoint: {result['params'] / 1e6:.1f}M parameters, {result['checkpoint_mb']:.0f} MiB", flush=True)
        result["load"] = _child(_MEM + _LOAD, str(ckpt))
        print(f"load: {result['load']}", flush=True)
        try:
            import torch  # noqa: F401

            result["transformers_load"] = _child(_MEM + _TORCH, str(ckpt))
            print(f"transformers load: {result['transformers_load']}", flush=True)
        except ImportError:
            result["transformers_load"] = None
        result["decode"] = {"prompt": args.prompt, "new": args.new, "batch": 1}
        result["decode"].update(_child(_DECODE, str(ckpt), str(args.prompt), str(args.new)))
        print(f"decode: {result['decode']}", flush=True)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"hf_load_decode_{device}.json")
    files.write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
