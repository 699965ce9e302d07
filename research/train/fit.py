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

from research import errors, log
from research.train import checkpoint, distributed, sharding
from research.train import step as step_lib


class Interrupted(Exception):
    """Training stopped on a signal after saving a checkpoint; rerunning the same command resumes."""


@dataclasses.dataclass
class Loop:
    """Everything a training loop needs besides its state.

    Attributes:
      graphdef, tx, schedule: the model, the optimizer (wrapped in `core.keep_masked` when the transform masks)
        and its learning-rate schedule (logged).
      batches: a `dataset.Batches` (step -> batch, a pure function of seed and step).
      state_sh, batch_sh: shardings of the state tree and of a batch.
      ckpts: the run's `checkpoint.Checkpoints`; logger: its `log.Logger`.
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
    ckpts: checkpoint.Checkpoints
    logger: log.Logger
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
    signalled: bool


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


def _agreed(flag: bool) -> bool:
    """Whether any process was signalled (every process gets the same answer)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def save(lp: Loop, step: int, state) -> None:
    """Checkpoints `state` as `step`; a failed write is a one-line UserError naming the step to resume from."""
    try:
        lp.ckpts.save(step, state, lp.meta(step))
    except (errors.UserError, KeyboardInterrupt):
        raise
    except Exception as e:  # disk full, permissions, a vanished directory: orbax raises many types
        saved = [s for s in lp.ckpts.all_steps() if s < step]
        back = f"rerun the same command to resume from step {saved[-1]}" if saved else "rerun to start again"
        raise errors.UserError(
            f"saving checkpoint step {step} in {lp.ckpts.dir} failed ({type(e).__name__}: "
            f"{checkpoint._short(e)}); free space or fix the directory, then {back}"
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
    last_loss, signalled = float("nan"), False
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
            stopping = _agreed(bool(stop)) if do_log or jax.process_count() == 1 else False
            do_save = done % lp.ckpt_every == 0 or done == end or stopping
            if do_log or do_eval or do_save:
                _check_finite(pending, state if do_save else None, lp.ckpts)
                pending.clear()
            if do_log:
                last_loss = float(m["loss"])
                lr = float(lp.schedule(s))
                lp.logger.log(lp.log_offset + done, {"loss": last_loss, "grad_norm": float(m["grad_norm"]), "lr": lr})
                bar.set_postfix(loss=f"{last_loss:.4f}")
            if do_eval or do_save:
                jax.block_until_ready(state)  # queued steps finish inside the timing, not in the pause
                t0 = time.time()
                if do_eval:
                    val = lp.evaluate(state)
                    lp.logger.log(lp.log_offset + done, log.numeric(val), split="val")
                    if distributed.is_main():
                        tqdm.write(
                            f"step {done}: train loss {last_loss:.4f}, val loss {val['loss']:.4f} nats/token, "
                            f"{val['bits_per_byte']:.4f} bits/byte"
                        )
                if do_save:
                    save(lp, done, state)
                paused += time.time() - t0
            if stopping:
                signalled = True
                break
    bar.close()
    jax.block_until_ready(state)
    timed = time.time() - t_mark - paused if t_mark is not None else 0.0
    return Result(state, start, timed_steps, timed, last_loss, signalled)


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
    saved = ckpts.all_steps()  # listed only when reporting: not a directory scan at every log step
    kept = f"the last finite checkpoint, step {saved[-1]}, is kept" if saved else "no checkpoint was saved"
    raise errors.UserError(
        f"training diverged at step {step} ({what}); {kept}. Lower the learning rate or raise the warmup steps, "
        "and use a new --workdir or resume from that checkpoint"
    )


@jax.jit
def _all_finite(params):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))
