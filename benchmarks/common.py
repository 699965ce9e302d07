"""What the benchmarks share: the timing loop of a jitted train step, the environment every result file records,
and the one writer of result files (`benchmarks/results/<name>_<device>.json` unless `--out` names another).

Scripts run as `python benchmarks/<name>.py`, so this directory is on `sys.path` and `import common` finds it.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import jax

from research import files, hardware

RESULTS = Path(__file__).resolve().parent / "results"


def timed_steps(step, state, batch, n: int) -> list[float]:
    """Seconds of each of `n` calls of `step(state, batch) -> (state, metrics)` after one compiling call; each
    waits for its loss."""
    state, m = step(state, batch)  # compile
    jax.block_until_ready(m["loss"])
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t0)
    return times


def environment(name: str, load=None) -> dict:
    """The command, device, versions and load (`load`: the load average taken when the run started; default: now)
    a result was measured under."""
    return {
        "command": "python " + " ".join([f"benchmarks/{name}.py", *sys.argv[1:]]),
        "device": hardware.describe(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg() if load is None else load,
    }


def write(name: str, result: dict, out=None) -> Path:
    """Writes `result` (atomically) to `out`, or to results/<name>_<device>.json; prints where."""
    path = Path(out) if out else RESULTS / f"{name}_{hardware.slug()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(path, result)
    print(f"wrote {path}")
    return path
