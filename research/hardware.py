"""What the run is on, and the peak matmul throughput of known accelerators (for model FLOPs utilisation).

Peaks are dense (no sparsity) per-chip figures from the vendors' data sheets. CPUs have no entry: their MFU is not
reported.
"""

from __future__ import annotations

import os
import re

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
