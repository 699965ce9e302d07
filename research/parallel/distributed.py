"""Many processes, one program: start-up, each process's slice of a batch, and who writes.

JAX runs one process per host (or per GPU); `initialize` connects them once at start-up, before any device is
used. It is configured by a run's `distributed` section or the environment:

    distributed.enabled=True                        # or ZIPLM_DISTRIBUTED=1
    distributed.coordinator="10.0.0.1:1234"         # or JAX_COORDINATOR_ADDRESS
    distributed.num_processes=4, process_id=0..3    # or JAX_NUM_PROCESSES / JAX_PROCESS_ID

and left unset on a Cloud TPU VM, under SLURM (`srun`), Open MPI or Kubernetes, where JAX detects all three.
After it, `jax.devices()` lists every process's devices, the mesh spans them all, and the arrays of the training
state are global arrays of which each process holds its own shards.

Batches. Every process computes only its own rows of each global batch (`local_rows`: the rows its devices hold
under the batch sharding) and the global array is formed with `jax.make_array_from_process_local_data`
(`put_batch`). The rows are those of the single-process batch (`dataset.Batches.rows`), so a batch is a pure
function of (seed, step) whatever the number of processes, and a run resumes on another process count.

Evaluation and calibration split their windows over the mesh's data devices the same way (`put_rows`: every
process holds the windows, each puts only its rows), and results sharded across processes come back whole on every
process through `to_host`.

Writes. Logs, progress bars and result files come from process 0 only (`is_main`); orbax checkpoints are written
and read by every process. A failure that only process 0 can see (writing the result) is shared by `together`, so
every process exits with the same status instead of the others waiting in their next collective. CPU collectives
between processes use gloo (JAX's default for the CPU backend).
"""

from __future__ import annotations

import contextlib
import os

import jax
import numpy as np

from research import errors


def is_main() -> bool:
    """Whether this is process 0, the one that logs and writes result files."""
    return jax.process_index() == 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise errors.UserError(f"{name}={value!r} is not an integer") from None


def connected() -> bool:
    """Whether this process has joined a multi-process run (without starting a backend)."""
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.client is not None


def initialize(dcfg) -> bool:
    """Connects this process to the others when `dcfg` (a config's `distributed` section) or ZIPLM_DISTRIBUTED=1
    asks for it; a no-op otherwise and when already connected. Returns whether the run is multi-process.

    Raises:
      UserError: the settings are incomplete or the coordinator cannot be reached (one line naming the fix).
    """
    dcfg = dict(dcfg or {})
    enabled = bool(dcfg.get("enabled")) or os.environ.get("ZIPLM_DISTRIBUTED", "") not in ("", "0")
    if not enabled:
        return jax.process_count() > 1
    if connected():  # already (a second run in one process)
        return jax.process_count() > 1
    coordinator = dcfg.get("coordinator") or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    n = dcfg.get("num_processes")
    n = _env_int("JAX_NUM_PROCESSES") if n is None else n
    pid = dcfg.get("process_id")
    pid = _env_int("JAX_PROCESS_ID") if pid is None else pid
    given = [x is not None for x in (coordinator, n, pid)]
    if any(given) and not all(given):
        raise errors.UserError(
            "distributed: give coordinator, num_processes and process_id together (or none of them, where JAX "
            "detects them: Cloud TPU, SLURM, Open MPI, Kubernetes)"
        )
    if pid is not None and not 0 <= pid < n:
        raise errors.UserError(f"distributed.process_id={pid} must lie in 0 .. num_processes - 1 = {n - 1}")
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=n, process_id=pid)
    except (RuntimeError, ValueError) as e:
        text = " ".join(str(e).split())[:200]
        raise errors.UserError(
            f"distributed start-up failed ({text}); check the coordinator address and that every process runs"
        ) from None
    return jax.process_count() > 1


def local_rows(sharding, n: int) -> tuple[int, int]:
    """[lo, hi): the rows of an (n, ...) batch that this process's devices hold under `sharding`.

    Raises:
      UserError: the process's rows are not one contiguous range (a mesh whose device order interleaves
        processes along the batch axes).
    """
    spans = {
        (s.start or 0, n if s.stop is None else s.stop)
        for s, *_ in sharding.addressable_devices_indices_map((n,)).values()
    }
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    covered = np.zeros(hi - lo, bool)
    for a, b in spans:
        covered[a - lo : b - lo] = True
    if not covered.all():
        raise errors.UserError(
            "this process's batch rows are not contiguous under the mesh; order the mesh's devices by process"
        )
    return lo, hi


def put_batch(batches, step: int, sharding) -> dict:
    """The global batch of `step` as arrays with `sharding`, each process computing only its own rows."""
    lo, hi = local_rows(sharding, batches.batch_size)
    local = batches.rows(step, lo, hi)
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (batches.batch_size, *v.shape[1:]))
        for k, v in local.items()
    }


def put_rows(array: np.ndarray, sharding) -> jax.Array:
    """A host array that every process holds whole, as a global array split along its rows by `sharding`."""
    lo, hi = local_rows(sharding, array.shape[0])
    return jax.make_array_from_process_local_data(sharding, array[lo:hi], array.shape)


def to_host(tree):
    """A tree of arrays as numpy arrays holding their whole values on every process: an array sharded across
    processes (fsdp or tensor rules in a multi-process run) is gathered; any other array is copied from the
    devices this process holds."""
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)


@contextlib.contextmanager
def together(what: str = "another process failed; see its error"):
    """Runs a block that may fail on some processes only (process 0 writing a result): when it raises on any
    process, it raises there as itself and on every other process as `errors.UserError(what)`, so all of them
    stop with the same status instead of waiting for the failed one in their next collective. Every process must
    enter the block; in one process it is the block alone."""
    if jax.process_count() == 1:
        yield
        return
    try:
        yield
    except Exception:
        any_process(True)
        raise
    if any_process(False):
        raise errors.UserError(what)


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (a no-op in one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process (every process gets the same answer; a collective in a multi-process
    run, so every process must call it)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
