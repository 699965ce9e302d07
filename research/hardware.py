"""What the run is on, and the peak matmul throughput of known accelerators (for model FLOPs utilisation).

Peaks are dense (no sparsity) per-chip figures from the vendors' data sheets. CPUs have no entry: their MFU is not
reported.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import platform
import re
from pathlib import Path

import jax

# device_kind substring -> {dtype: peak FLOP/s}
PEAKS = {
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},  # SXM
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},
    "V100": {"float16": 125e12, "float32": 15.7e12},
    "TPU v4": {"bfloat16": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12},
    "TPU v5p": {"bfloat16": 459e12},
    "TPU v6 lite": {"bfloat16": 918e12},
}


def describe() -> str:
    """E.g. "1 x NVIDIA H100 80GB HBM3" or "1 x cpu"."""
    return f"{jax.device_count()} x {jax.devices()[0].device_kind}"


def host_cpus() -> int:
    """The CPU cores this process may run on (its affinity). XLA's CPU backend splits matmul reductions over that many
    threads, so CPU results are bit-reproducible at the same core count only: `taskset -c 0` and two cores round a
    calibration Hessian differently, and GPTQ / SparseGPT / Wanda then choose some codes or mask entries differently."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu() -> str:
    """The host CPU's model and the widest x86 vector extension it has, e.g. "AMD EPYC (x86_64, avx512)".

    XLA compiles CPU programs for the host's instruction set, and the vector width changes how reductions are
    split: on the same core count, the demo's one-shot compression rows differ in the 4th decimal between AVX-512
    and AVX2 code on one machine (`XLA_FLAGS=--xla_cpu_max_isa=AVX2`; the README's reproducibility note). A cap in
    XLA_FLAGS is named too."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
            if flags and model != "unknown":
                break
    except OSError:
        pass
    isa = next((f for f in ("avx512f", "avx2", "avx", "sse4_2") if f in flags), None)
    isa = {"avx512f": "avx512"}.get(isa, isa)
    cap = re.search(r"--xla_cpu_max_isa=(\S+)", os.environ.get("XLA_FLAGS", ""))
    parts = [platform.machine()] + ([isa] if isa else []) + ([f"XLA max ISA {cap.group(1)}"] if cap else [])
    return f"{model} ({', '.join(parts)})"


LOCKS = ("test", "dev", "bench", "llama", "main")  # requirements/<name>.txt, the larger sets first


@functools.lru_cache(maxsize=1)
def lock() -> dict | None:
    """Which lock file of the checkout (`requirements/*.txt`, made by `make lock`) this environment holds exactly:
    {"file", "sha256" (of the file), "exact": True}; {"file": None, "exact": False, "differ": [...]} when no lock
    file's every pin is installed at its version (a few of the main lock's differences named); None outside a
    checkout."""
    folder = Path(__file__).resolve().parents[1] / "requirements"
    if not folder.is_dir():
        return None
    installed = {
        re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): d.version
        for d in importlib.metadata.distributions()
        if d.metadata["Name"]
    }
    differ = []
    for name in LOCKS:
        path = folder / f"{name}.txt"
        if not path.is_file():
            continue
        text = path.read_text()
        pins = {
            re.sub(r"[-_.]+", "-", n).lower(): v for n, v in re.findall(r"^([A-Za-z0-9_.\-]+)==([^ \\;]+)", text, re.M)
        }
        wrong = [
            f"{n} {installed.get(n, 'missing')} (locked {v})" for n, v in sorted(pins.items()) if installed.get(n) != v
        ]
        if not wrong:
            sha = hashlib.sha256(text.encode()).hexdigest()[:16]
            return {"file": f"requirements/{name}.txt", "sha256": sha, "exact": True}
        if name == "main":
            differ = wrong[:5]
    return {"file": None, "exact": False, "differ": differ}


def environment() -> dict:
    """What a result depends on beyond its config: the jax version, the CPU (`cpu`), the lock file (`lock`)."""
    return {"jax": jax.__version__, "cpu": cpu(), "lock": lock()}


def slug() -> str:
    """A file-name-safe device name, e.g. "nvidia-h100-80gb-hbm3" or "cpu"."""
    return re.sub(r"[^a-z0-9]+", "-", jax.devices()[0].device_kind.lower()).strip("-")


def peak_flops(dtype: str) -> float | None:
    """Peak FLOP/s of all devices together for a compute dtype, or None when unknown (e.g. CPUs)."""
    kind = jax.devices()[0].device_kind
    for name, peaks in PEAKS.items():
        if name.lower() in kind.lower():
            peak = peaks.get(dtype)
            return peak * jax.device_count() if peak else None
    return None


def device_memory_bytes() -> int | None:
    """Memory one device can use: an accelerator's allocator limit, or the host's available memory for CPU
    devices (shared by all of them); None when unknown."""
    device = jax.local_devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        return stats.get("bytes_limit")
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def training_bytes(mcfg, n_params: int, batch_per_device: int, seq_len: int, param_shards: int) -> int:
    """A rough estimate of one device's training memory (no rematerialisation): float32 parameters, gradients and
    two AdamW moments (sharded `param_shards` ways), the activations the backward pass keeps (about 10 d_model +
    3 d_ff + 2 heads x seq_len values per token and layer) and the logits with their gradient. Meant to catch a
    batch that cannot fit by a wide margin, not to plan memory."""
    d, f = mcfg.d_model, mcfg.d_ff or 4 * mcfg.d_model
    act = {"float32": 4}.get(mcfg.dtype, 2)
    per_token = mcfg.n_layer * (10 * d + 3 * f + 2 * mcfg.n_head * seq_len) * act + 2 * mcfg.vocab_size * 4
    state = 16 * n_params // max(1, param_shards)
    return state + batch_per_device * seq_len * per_token


def release_freed_memory() -> None:
    """Hands the C heap's freed pages back to the OS (glibc's malloc_trim; a no-op elsewhere).

    Loading a checkpoint frees one NumPy temporary per tensor; glibc keeps such pages mapped, so the process's RSS
    stays ~60 MB above what it holds after SmolLM2-135M loads (benchmarks/eval_memory.py)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl), or no C library found
        pass
