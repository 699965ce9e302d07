"""Fine-tuning under a compression transform: the forward pass sees the effective parameters, masked weights stay
exactly zero (`core.keep_masked` around the optimizer), and the transform's `update` runs after every step.

One jitted step over split state, as in `research.train.step`; batches are a pure function of (seed, step), so the
same config and seed give the same result.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from research.compress import core
from research.train import optim
from research.train import step as step_lib


def finetune(
    graphdef, params, transform: core.Transform, cstate, batches, t, *, seed: int = 0, log=None, progress=None
):
    """Fine-tunes `params` under `transform` for `t.steps` steps.

    Args:
      graphdef: the model's graphdef.
      params: the raw parameter tree (not modified; a copy is trained).
      transform: the compression transform; cstate: its state (not modified either).
      batches: step -> {"inputs", "targets"} (a `dataset.Batches`).
      t: optimizer settings with the fields of a train config's `train` section (steps, lr, min_lr,
        warmup_steps, weight_decay, b1, b2, grad_clip) plus log_every.
      seed: the step's key seed (fine-tuning runs without dropout).
      log: optional callable (step, {"loss", "grad_norm", "lr"}).
      progress: show a progress bar (None: only on a terminal).

    Returns:
      (params, cstate, {"steps", "loss" (last), "seconds", "step_seconds" (mean after the first step)}).
    """
    tx = core.keep_masked(optim.make(t))
    params, cstate = jax.tree.map(jnp.copy, (params, cstate))  # the step donates its state
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params), "compress": cstate}
    step_fn = step_lib.make_train_step(graphdef, tx, seed=seed, dropout=False, transform=transform)
    schedule = optim.schedule(t)
    t0, t_first, loss = time.time(), None, float("nan")
    for s in tqdm(range(t.steps), desc="finetune", disable=None if progress is None else not progress):
        state, m = step_fn(state, jax.device_put(batches(s)))
        if s == 0:
            jax.block_until_ready(m["loss"])
            t_first = time.time()
        if (s + 1) % t.log_every == 0 or s + 1 == t.steps:
            loss = float(m["loss"])
            if log is not None:
                log(s + 1, {"loss": loss, "grad_norm": float(m["grad_norm"]), "lr": float(schedule(s))})
    jax.block_until_ready(state)
    end = time.time()
    per_step = (end - t_first) / (t.steps - 1) if t.steps > 1 else None
    return (
        state["params"],
        state["compress"],
        {"steps": t.steps, "loss": loss, "seconds": end - t0, "step_seconds": per_step},
    )
