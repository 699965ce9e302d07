"""Orbax checkpoints of a run: the training state plus a JSON record of everything needed to continue it.

Layout: `<run dir>/checkpoints/<step>/{state, meta}`. `state` is {"step", "params", "opt_state"}; `meta` holds the
run config, the model config, the tokenizer spec and the data position (the sampler's seed and next step). Restoring
uses an abstract target so optax state objects come back as they were, with the shardings of the current mesh.

Integrity, checked on every restore (and so by resume, eval, pack and every other loader of a run):
- every step's `meta` carries a manifest of the state's content (`checksums`: two 32-bit sums of each array's
  words, a plain and a position-weighted one, computed on the devices, so they do not depend on the mesh) and a
  SHA-256 of the rest of `meta`, written in the same orbax commit as the state: a single flipped bit in a tensor
  changes both sums;
- once the commit is final, `<step>/ziplm-files.sha256.json` lists the SHA-256 of every file of the step, so damage
  that does not change a restored value (a byte orbax never reads back) is found too.
A damaged step never restores silently: with no step asked for, restore falls back to the newest intact step with a
warning naming the damaged one; asked for explicitly, a damaged step is a `CorruptData` error. The checks detect
damage, not tampering. Steps written before the manifests existed restore with a warning that they are unverified.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from research import errors, files, tree
from research.parallel import distributed

CHECKSUM = "u32sum+weighted/v1"
FILE_MANIFEST = "ziplm-files.sha256.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _words(a):
    """An array's bits as a flat uint32 vector (narrower types widened, 64-bit ones split in two words)."""
    a = jnp.asarray(a)
    size = a.dtype.itemsize
    if a.dtype == jnp.bool_:
        return a.reshape(-1).astype(jnp.uint32)
    if size == 4:
        return jax.lax.bitcast_convert_type(a, jnp.uint32).reshape(-1)
    if size < 4:
        unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
        return jax.lax.bitcast_convert_type(a, unsigned).reshape(-1).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(a, jnp.uint32).reshape(-1)  # (..., 2) for 8-byte types


@jax.jit
def _sums(leaves):
    out = []
    for a in leaves:
        w = _words(a)
        odd = 2 * jnp.arange(w.shape[0], dtype=jnp.uint32) + 1  # odd weights: one flipped bit always changes it
        out.append(jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * odd, dtype=jnp.uint32)]))
    return out


def checksums(state) -> dict[str, list[int]]:
    """{leaf path: [sum of its uint32 words, sum weighted by odd position weights]} (mod 2**32), mesh-independent."""
    flat = tree.flatten(state)
    sums = jax.device_get(_sums(list(flat.values())))
    return {k: [int(x) for x in np.asarray(v)] for k, v in zip(flat, sums)}


def _meta_digest(meta: dict) -> str:
    rest = {k: v for k, v in meta.items() if k not in ("checksums", "meta_sha256")}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, default=str).encode()).hexdigest()


def _warn(msg: str) -> None:
    if jax.process_index() == 0:
        print(f"warning: {msg}", file=sys.stderr, flush=True)


def exists(workdir: Path) -> bool:
    """Whether `workdir` holds at least one finished checkpoint (without starting a CheckpointManager)."""
    ckpt_dir = Path(workdir) / "checkpoints"
    return ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())


class Checkpoints:
    """A thin wrapper over `ocp.CheckpointManager` for one run directory."""

    def __init__(self, workdir: Path, keep: int = 2, create: bool = True):
        self.dir = Path(workdir).resolve() / "checkpoints"
        # cleanup_tmp_directories: a step's temporary directory left by a killed save goes when the run resumes
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, cleanup_tmp_directories=True)
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self._mgr = ocp.CheckpointManager(self.dir, options=options, item_handlers=handlers)

    def all_steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def delete(self, step: int) -> None:
        self._mgr.delete(step)

    def save(self, step: int, state, meta: dict) -> None:
        """Saves `state` and `meta` as step `step`, with the manifest of the state's content in `meta`.

        A failed save (a full disk, a vanished directory) raises with orbax's background threads' tracebacks kept
        off stderr (the caller reports one line) and the step's temporary directory removed."""
        meta = {**meta, "checksum": CHECKSUM, "checksums": checksums(state)}
        meta["meta_sha256"] = _meta_digest(meta)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        try:
            with _stderr_kept_on_failure():
                self._mgr.save(step, args=args, force=True)
                self._mgr.wait_until_finished()  # the files are final: hash them
        except BaseException:
            if jax.process_index() == 0:
                for tmp in self.dir.glob(f"{step}.orbax-checkpoint-tmp*"):
                    shutil.rmtree(tmp, ignore_errors=True)
            raise
        if jax.process_index() == 0:
            step_dir = self.dir / str(step)
            hashes = {str(f.relative_to(step_dir)): _sha256(f) for f in sorted(step_dir.rglob("*")) if f.is_file()}
            files.write_json(step_dir / FILE_MANIFEST, hashes)

    def _check_files(self, step: int) -> None:
        """Compares the step's files with the SHA-256 manifest written after its commit (absent when the process
        stopped between the commit and the manifest: the content checksums still apply)."""
        step_dir = self.dir / str(step)
        manifest = step_dir / FILE_MANIFEST
        if jax.process_index() != 0 or not manifest.is_file():
            return
        where = f"checkpoint step {step} in {self.dir} is damaged"
        try:
            hashes = json.loads(manifest.read_text())
        except (ValueError, UnicodeDecodeError):
            hashes = None
        if not isinstance(hashes, dict):
            raise errors.CorruptData(f"{where}: its file manifest {FILE_MANIFEST} does not read")
        for name, digest in hashes.items():
            f = step_dir / name
            if not f.is_file():
                raise errors.CorruptData(f"{where}: {name} is missing")
            if _sha256(f) != digest:
                raise errors.CorruptData(f"{where}: {name} does not match its SHA-256")

    def meta(self, step: int | None = None) -> dict:
        """The meta record of `step` (default: the newest step whose record is intact), verified."""
        if step is not None:
            return self._read_meta(self.resolve(step))
        return self.restore_verified(None, None)[1]

    def _read_meta(self, step: int) -> dict:
        where = f"checkpoint step {step} in {self.dir}"
        try:
            meta = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:  # orbax raises many types for a damaged or missing file
            raise errors.CorruptData(f"{where} is damaged: its meta record does not read ({_short(e)})") from None
        if not isinstance(meta, dict):
            raise errors.CorruptData(f"{where} is damaged: its meta record is not a JSON object")
        if "meta_sha256" in meta and meta["meta_sha256"] != _meta_digest(meta):
            raise errors.CorruptData(f"{where} is damaged: its meta record does not match its SHA-256")
        return meta

    def restore(self, target, step: int | None = None):
        """Restores (state, meta) at `step` (default: the newest intact step) into the structure and shardings of
        `target`, verified against the step's manifest.

        Args:
          target: a state tree of arrays or ShapeDtypeStructs (with .sharding) giving structure and placement.
        """
        state, meta, _ = self.restore_verified(lambda meta: target, step)
        return state, meta

    def restore_verified(self, make_target: Callable[[dict], object] | None, step: int | None = None):
        """(state, meta, step): the given step, or with None the newest step that restores intact.

        Args:
          make_target: maps the step's meta record to the target tree (see `restore`); None reads only the meta
            (state is then None).
          step: a saved step; a damaged one is a CorruptData error. None tries the steps newest first, warning
            about each damaged one it skips.
        """
        steps = [self.resolve(step)] if step is not None else self.all_steps()[::-1]
        if not steps:
            raise errors.UserError(f"no checkpoint in {self.dir}")
        damaged, tried = [], set()
        while steps:
            s = steps.pop(0)
            tried.add(s)
            try:
                self._agreed(s, lambda s=s: self._check_files(s))
                meta = self._agreed(s, lambda s=s: self._read_meta(s))
                if make_target is None:
                    state = None
                else:
                    state = self._agreed(s, lambda s=s, m=meta: self._restore_state(s, make_target(m), m))
            except errors.CorruptData as e:
                if not (self.dir / str(s)).exists():
                    # Rotated away by a run that is training (it saved a newer step meanwhile): take the newest.
                    if step is not None:
                        msg = f"checkpoint step {s} of {self.dir} was deleted while it was read"
                        raise errors.UserError(msg) from None
                    self._mgr.reload()
                    steps = [t for t in self.all_steps()[::-1] if t not in tried]
                    continue
                if step is not None:
                    raise
                damaged.append(s)
                _warn(f"{e}; trying an older step")
                continue
            if damaged:
                _warn(f"using checkpoint step {s} of {self.dir}, the newest intact one (damaged: {damaged})")
            return state, meta, s
        if not damaged:
            raise errors.UserError(f"no checkpoint left in {self.dir} (they were deleted while reading)")
        raise errors.CorruptData(f"every checkpoint in {self.dir} is damaged (steps {damaged}); nothing to restore")

    def _agreed(self, step: int, check: Callable):
        """`check()`, with its verdict shared: a CorruptData on any process is one on every process, so all of them
        fall back to the same older step (process 0 alone reads the file manifest; a restore may fail on one)."""
        problem, out = None, None
        try:
            out = check()
        except errors.CorruptData as e:
            problem = e
        if distributed.any_process(problem is not None):
            where = f"checkpoint step {step} in {self.dir}"
            raise problem or errors.CorruptData(f"{where} is damaged (another process found it)")
        return out

    def _restore_state(self, step: int, target, meta: dict):
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        self._check_shapes(step, abstract)
        where = f"checkpoint step {step} in {self.dir}"
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        try:
            state = self._mgr.restore(step, args=args).state
        except Exception as e:
            raise errors.CorruptData(f"{where} is damaged: its state does not read ({_short(e)})") from None
        expected = meta.get("checksums")
        if expected is None:
            _warn(f"{where} predates integrity manifests: restored unverified")
            return state
        got = checksums(state)
        for k in sorted(set(expected) | set(got)):
            if expected.get(k) != got.get(k):
                raise errors.CorruptData(f"{where} is damaged: {k} does not match its checksum")
        return state

    def _check_shapes(self, step: int, abstract) -> None:
        """Compares the stored arrays' shapes with the target's, naming the first tensor that disagrees."""
        try:
            stored = tree.flatten(self._mgr.item_metadata(step)["state"])
        except Exception as e:
            raise errors.CorruptData(f"checkpoint step {step} in {self.dir} is damaged ({_short(e)})") from None
        stored = {k: tuple(v.shape) for k, v in stored.items()}
        wanted = {k: tuple(v.shape) for k, v in tree.flatten(abstract).items()}
        where = f"checkpoint {self.dir / str(step)} was written by an incompatible config"
        for k in wanted:
            if k not in stored:
                raise errors.UserError(f"{where}: it has no tensor {k}")
            if stored[k] != wanted[k]:
                raise errors.UserError(f"{where}: {k} has shape {stored[k]} there, but the config gives {wanted[k]}")
        extra = sorted(set(stored) - set(wanted))
        if extra:
            raise errors.UserError(f"{where}: it has tensors this model lacks ({', '.join(extra[:3])})")

    def resolve(self, step: int | None) -> int:
        """`step` if it was saved, else the latest step for None; a UserError when there is none."""
        steps = self.all_steps()
        if not steps:
            raise errors.UserError(f"no checkpoint in {self.dir}")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise errors.UserError(f"no checkpoint for step {step} in {self.dir}; available steps: {steps}")
        return step

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.close()


@contextlib.contextmanager
def _stderr_kept_on_failure():
    """Runs the block with stderr (the file descriptor, so threads and C++ logging too) going to a temporary file
    and orbax's loggers quiet: replayed when the block succeeds, dropped when it raises. A failed orbax save logs
    hundreds of lines of tracebacks from its threads before it raises; the caller's one-line error replaces them."""
    quiet = [logging.getLogger(name) for name in ("absl", "asyncio")]
    levels = [lg.level for lg in quiet]
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as buf:
        os.dup2(buf.fileno(), 2)
        failed = True
        try:
            for lg in quiet:
                lg.setLevel(logging.CRITICAL)
            yield
            failed = False
        finally:
            for lg, level in zip(quiet, levels):
                lg.setLevel(level)
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if not failed:
                buf.seek(0)
                text = buf.read()
                if text:
                    sys.stderr.write(text.decode(errors="replace"))


def load_run(workdir: str | Path, step: int | None = None):
    """Loads a trained model from a run directory.

    Args:
      workdir: a run directory written by `ziplm train`.
      step: checkpoint step (default: the latest).

    Returns:
      (config, graphdef, params, meta): the run's ConfigDict, the model graphdef, its parameters, the
      checkpoint's meta record (which includes the step under "step").
    """
    from research import config as config_lib
    from research import models
    from research.train import optim
    from research.train import step as step_lib

    workdir = Path(workdir).expanduser()
    if not (workdir / "checkpoints").is_dir():
        raise errors.UserError(f"{workdir} is not a run directory (no checkpoints/ inside)")
    ckpts = Checkpoints(workdir, create=False)
    # Restore onto this process's first device, whatever mesh (and however many processes) wrote the checkpoint.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def target(meta):
        cfg = config_lib.from_dict(meta["config"])
        _, abstract_params = models.abstract(config_lib.model_cfg(cfg))
        abstract_state = step_lib.abstract_state(abstract_params, optim.make(cfg.train))
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract_state)

    try:
        state, meta, step = ckpts.restore_verified(target, step)
    finally:
        ckpts.close()
    cfg = config_lib.from_dict(meta["config"])
    graphdef, _ = models.abstract(config_lib.model_cfg(cfg))
    return cfg, graphdef, state["params"], {**meta, "step": step}


def _short(e: Exception) -> str:
    """An exception as one short line."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."
