"""The one training loop: training from scratch (`loop.train`) and fine-tuning under a compression transform
(`compress.pipeline`) both run `fit`.

    lp = fit.Loop(graphdef, tx, schedule, batches, state_sh, batch_sh, ckpts, logger, meta, steps=..., ...)
    state = fit.place(fit.new_state(params, tx, cstate), state_sh)   # or fit.restore(...) on resume
    result = fit.run(lp, state)

The state is {"step", "params", "opt_state"} plus "compress" (the transform's state) when a transform is given:
it is sharded by `state_shardings` (optimizer moments, masks and codes like their kernel, per-channel scales on
the kernel's matching axis, codebooks and scalars replicated), checkpointed whole, and restored whole, so a
resumed run continues the same trajectory bit for bit. Batches are placed with `distributed.put_batch` (each
process builds only its rows). Logging every `log_every` steps (JSONL + W&B, process 0), evaluation every
`eval_every`, checkpoints every `ckpt_every` and at the end; a first SIGINT / SIGTERM stops at the next step
boundary after saving a checkpoint (in a multi-process run the processes agree on it at the next logging step),
and the loop raises nothing itself: `Result.signalled` says it stopped early. A non-finite loss, gradient norm or
parameter stops the run before it is checkpointed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from research import errors, files, log
from research.parallel import distributed, sharding
from research.train import checkpoint
from research.train import step as step_lib


class Interrupted(Exception):
    """Training stopped on a signal after saving a checkpoint; rerunning the same command resumes. `signum`: the
    signal (the CLI exits with 128 + it, as a shell reports a process that signal ended), 0 for `stop_at`."""

    def __init__(self, message: str, signum: int = 0):
        super().__init__(message)
        self.signum = signum


@dataclasses.dataclass
class Loop:
    """Everything a training loop needs besides its state.

    Attributes:
      graphdef, tx, schedule: the model, the optimizer (wrapped in `core.keep_masked` when the transform masks)
        and its learning-rate schedule (logged).
      batches: a `dataset.Batches` (step -> batch, a pure function of seed and step).
      state_sh, batch_sh: shardings of the state tree and of a batch.
      ckpts: the run's `checkpoint.Checkpoints` (None: no checkpoints); logger: its `log.Logger` (None: none).
      meta: step -> the checkpoint's meta record (config, data position...).
      steps: the step the loop ends at.
      transform: a `core.Transform` the forward pass runs under (state["compress"] holds its state), or None.
      evaluate: state -> metrics of the periodic evaluation (None: none).
      log_offset: added to the step in logs (compress stages continue one metrics file).
    """

    graphdef: Any
    tx: Any
    schedule: Callable
    batches: Any
    state_sh: Any
    batch_sh: Any
    ckpts: checkpoint.Checkpoints | None
    logger: log.Logger | None
    meta: Callable[[int], dict]
    steps: int
    log_every: int = 10
    eval_every: int = 0
    ckpt_every: int = 1000
    seed: int = 0
    dropout: bool = False
    transform: Any = None
    evaluate: Callable | None = None
    log_offset: int = 0
    desc: str = "train"


@dataclasses.dataclass
class Result:
    state: dict
    start: int
    timed_steps: int
    timed_seconds: float
    last_loss: float
    signalled: int  # the signal that stopped the loop (0: none)


def new_state(params, tx, cstate=None) -> dict:
    state = step_lib.init_state(params, tx)
    if cstate is not None:
        state["compress"] = cstate
    return state


def state_shardings(abstract_state, abstract_params, rules, mesh):
    """Shardings of a training state: parameters by the rules, everything else mirrored (`sharding.mirror`)."""
    param_sh = sharding.named(sharding.param_specs(abstract_params, rules, mesh), mesh)
    return sharding.mirror(abstract_state, abstract_params, param_sh, mesh)


def place(state, state_sh):
    """A state of host or single-device arrays, put on the mesh (every process holds the same values)."""
    return jax.device_put(jax.device_get(state), state_sh)


def restore(ckpts: checkpoint.Checkpoints, abstract_state, state_sh):
    """The newest intact checkpoint's state in the current shardings, with steps past it deleted (damaged ones
    that restore skipped with a warning: this run recomputes them)."""
    target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract_state, state_sh)
    state, _ = ckpts.restore(target)
    for newer in [s for s in ckpts.all_steps() if s > int(state["step"])]:
        ckpts.delete(newer)
    return state


@contextlib.contextmanager
def _stop_on_signal():
    """Yields a list that becomes non-empty when SIGINT/SIGTERM arrives (main thread only)."""
    flag: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag:  # a second signal stops at once
            raise KeyboardInterrupt
        flag.append(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def save(lp: Loop, step: int, state) -> None:
    """Checkpoints `state` as `step`; a failed write is a one-line UserError naming the step to resume from."""
    if lp.ckpts is None:
        return
    try:
        lp.ckpts.save(step, state, lp.meta(step))
    except (errors.UserError, KeyboardInterrupt):
        raise
    except Exception as e:  # disk full, permissions, a vanished directory: orbax raises many types
        saved = [s for s in lp.ckpts.all_steps() if s < step]
        back = f"rerun the same command to resume from step {saved[-1]}" if saved else "rerun to start again"
        why = files.os_reason(e) or f"{type(e).__name__}: {checkpoint._short(e)}"
        raise errors.UserError(
            f"saving checkpoint step {step} in {lp.ckpts.dir} failed ({why}); free space or fix the directory, "
            f"then {back}"
        ) from None


def run(lp: Loop, state, *, stop_at: int | None = None, progress: bool | None = None) -> Result:
    """Runs the loop from `state`'s step to `lp.steps` (or `stop_at`), checkpointing at the end.

    Raises:
      UserError: the run diverged (nothing non-finite is checkpointed) or a checkpoint could not be written.
    """
    start = int(state["step"])
    end = lp.steps if stop_at is None else min(stop_at, lp.steps)
    train_step = step_lib.make_train_step(
        lp.graphdef,
        lp.tx,
        seed=lp.seed,
        dropout=lp.dropout,
        state_shardings=lp.state_sh,
        batch_sharding=lp.batch_sh,
        transform=lp.transform,
    )
    timed_steps, t_mark, paused = 0, None, 0.0  # paused: evaluation and checkpoint time inside the timing
    last_loss, signalled = float("nan"), 0
    pending = []  # (step, loss, grad norm) on the device since the last check: checked without a sync per step
    show = distributed.is_main() and (progress is None or progress)
    bar = tqdm(range(start, end), desc=lp.desc, initial=start, total=end, disable=None if show else True)
    with _stop_on_signal() as stop:
        for s in bar:
            state, m = train_step(state, distributed.put_batch(lp.batches, s, lp.batch_sh))
            done = s + 1
            pending.append((done, m["loss"], m["grad_norm"]))
            if s == start:  # the first step compiles: time from its end
                jax.block_until_ready(m["loss"])
                t_mark = time.time()
            else:
                timed_steps += 1
            do_log = done % lp.log_every == 0 or done == end
            do_eval = bool(lp.eval_every) and lp.evaluate is not None and done % lp.eval_every == 0 and done < lp.steps
            # read once (agreed between processes at logging steps): a signal during this step's evaluation
            # stops the next one
            stopping = distributed.any_process(bool(stop)) if do_log or jax.process_count() == 1 else False
            do_save = done % lp.ckpt_every == 0 or done == end or stopping
            if do_log or do_eval or do_save:
                _check_finite(pending, state if do_save else None, lp.ckpts)
                pending.clear()
            if do_log or do_eval:  # an evaluation line shows its own step's loss, not the last logged one
                last_loss = float(m["loss"])
            if do_log:
                lr = float(lp.schedule(s))
                if lp.logger is not None:
                    record = {"loss": last_loss, "grad_norm": float(m["grad_norm"]), "lr": lr}
                    lp.logger.log(lp.log_offset + done, record)
                bar.set_postfix(loss=f"{last_loss:.4f}")
            if do_eval or do_save:
                jax.block_until_ready(state)  # queued steps finish inside the timing, not in the pause
                t0 = time.time()
                if do_eval:
                    val = lp.evaluate(state)
                    if lp.logger is not None:
                        lp.logger.log(lp.log_offset + done, log.numeric(val), split="val")
                    if distributed.is_main():
                        tqdm.write(
                            f"step {done}: train loss {last_loss:.4f}, val loss {val['loss']:.4f} nats/token, "
                            f"{val['bits_per_byte']:.4f} bits/byte"
                        )
                if do_save:
                    save(lp, done, state)
                paused += time.time() - t0
            if stopping:  # another process's signal stops this one too: as a SIGTERM
                signalled = int(stop[0]) if stop else int(signal.SIGTERM)
                break
    bar.close()
    jax.block_until_ready(state)
    timed = time.time() - t_mark - paused if t_mark is not None else 0.0
    return Result(state, start, timed_steps, timed, last_loss, signalled)


class Offset:
    """A batch stream read from step `offset` on (a fine-tuning stage continues the stream of the ones before)."""

    def __init__(self, batches, offset: int):
        self.inner, self.offset, self.batch_size = batches, offset, batches.batch_size

    def rows(self, step: int, lo: int, hi: int) -> dict:
        return self.inner.rows(step + self.offset, lo, hi)


def finetune(
    graphdef,
    params,
    transform,
    cstate,
    batches,
    t,
    *,
    workdir=None,
    mesh=None,
    rules="replicated",
    logger=None,
    log_offset: int = 0,
    evaluate=None,
    meta=None,
    seed: int = 0,
    progress=None,
    desc: str = "finetune",
) -> tuple:
    """Fine-tunes `params` under `transform` for `t.steps` steps through `run`, checkpointing into
    `workdir`/checkpoints (when given) and resuming from the newest intact step found there.

    Args:
      graphdef, params: the model and its raw parameters (not modified); transform, cstate: the transform and
        its state (not modified).
      batches: a `dataset.Batches` (or `Offset`).
      t: optimizer settings as a train config's `train` section (steps, lr, min_lr, warmup_steps, weight_decay,
        b1, b2, grad_clip, log_every; ckpt_every, keep_checkpoints and eval_every when present).
      mesh, rules: the device mesh (None: a single device) and the sharding rules of the parameters.
      evaluate: effective params -> metrics, every `t.eval_every` steps.
      meta: extra fields of every checkpoint's meta record.

    Returns:
      (params, cstate: numpy trees holding the whole values on every process, {"steps", "loss" (last logged;
      None when nothing ran), "seconds", "step_seconds",
      "resumed_from"}). Raises `Interrupted` when stopped by a signal (a checkpoint saved when `workdir` is set).
    """
    from research.compress import core
    from research.train import optim

    t0 = time.time()
    tx = core.keep_masked(optim.make(t))
    mesh = mesh if mesh is not None else sharding.make_mesh(1, 1)
    state = new_state(distributed.to_host(params), tx, distributed.to_host(cstate))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), state)
    state_sh = state_shardings(abstract, abstract["params"], rules, mesh)
    ckpts = None
    if workdir is not None:
        ckpts = checkpoint.Checkpoints(workdir, keep=t.get("keep_checkpoints", 2))
    try:
        resumed = ckpts is not None and bool(ckpts.all_steps())
        state = restore(ckpts, abstract, state_sh) if resumed else place(state, state_sh)
        effective = jax.jit(lambda st: transform.apply(st["params"], st["compress"]))
        lp = Loop(
            graphdef, tx, optim.schedule(t), batches, state_sh, sharding.batch_sharding(mesh, ("data",)), ckpts,
            logger, lambda step: {**(meta or {}), "next_step": step}, steps=t.steps, log_every=t.log_every,
            eval_every=t.get("eval_every", 0) or 0, ckpt_every=t.get("ckpt_every", t.steps) or t.steps, seed=seed,
            transform=transform, evaluate=None if evaluate is None else (lambda st: evaluate(effective(st))),
            log_offset=log_offset, desc=desc,
        )  # fmt: skip
        res = run(lp, state, progress=progress)
    finally:
        if ckpts is not None:
            ckpts.wait()
            ckpts.close()
    if res.signalled:
        where = f"; checkpoint saved in {workdir}" if workdir is not None else ""
        raise Interrupted(
            f"stopped at fine-tuning step {int(res.state['step'])}{where}; rerun to resume", res.signalled
        )
    n = res.timed_steps
    info = {
        "steps": t.steps,
        "loss": None if res.start == t.steps else res.last_loss,
        "seconds": time.time() - t0,
        "step_seconds": res.timed_seconds / n if n else None,
        "resumed_from": res.start if resumed else None,
    }
    return distributed.to_host(res.state["params"]), distributed.to_host(res.state["compress"]), info


def _check_finite(pending: list, state, ckpts) -> None:
    """Stops training at the first non-finite loss or gradient norm in `pending`, and before a save (`state` given)
    at non-finite parameters, so a diverged model is never checkpointed; the last finite checkpoint is kept."""
    values = jax.device_get([(loss, norm) for _, loss, norm in pending])
    bad = next(((step, v) for (step, _, _), v in zip(pending, values) if not np.all(np.isfinite(v))), None)
    if bad is None and state is not None and not bool(_all_finite(state["params"])):
        bad = (pending[-1][0] if pending else int(state["step"]), None)
    if bad is None:
        return
    step, v = bad
    what = f"loss {float(v[0])}, gradient norm {float(v[1])}" if v is not None else "non-finite parameters"
    saved = (
        ckpts.all_steps() if ckpts is not None else []
    )  # listed only when reporting: not a directory scan at every log step
    if saved:
        then = f"the last finite checkpoint, step {saved[-1]}, is kept. Lower the learning rate or raise the warmup "
        then += "steps, and use a new --workdir or resume from that checkpoint"
    else:
        then = "no checkpoint was saved. Lower the learning rate or raise the warmup steps, and rerun"
    raise errors.UserError(f"training diverged at step {step} ({what}); {then}")


@jax.jit
def _all_finite(params):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))
