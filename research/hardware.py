"""What the run is on, and the peak matmul throughput of known accelerators (for model FLOPs utilisation).

Peaks are dense (no sparsity) per-chip figures from the vendors' data sheets. CPUs have no entry: their MFU is not
reported.
"""

from __future__ import annotations

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
