"""Gradual magnitude pruning during fine-tuning (Zhu & Gupta 2017, "To prune, or not to prune").

The sparsity follows the cubic schedule

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / T) ** 3        for t0 <= t <= t0 + T

evaluated at the last multiple of `every` steps since t0 (the masks change only every `every` steps, and once more
at t0 + T when T is not a multiple of `every`, so the final sparsity is always reached), s_i before t0 and s_f
after. At each update the masks are recomputed from the magnitudes of the current masked weights, so pruned
weights never come back and sparsity only grows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from research import errors
from research.compress import core
from research.compress.prune import magnitude, masks


def polynomial(initial: float, final: float, start: int, steps: int, every: int):
    """The schedule as a function step -> sparsity (works on Python ints and traced steps)."""

    def schedule(step):
        t = jnp.clip(step - start, 0, steps)
        t = jnp.where(t >= steps, steps, (t // every) * every)  # the last step reaches the target
        frac = 1.0 - t / steps
        return final + (initial - final) * frac**3

    return schedule


def gradual(
    sparsity: float = 0.5,
    *,
    initial: float = 0.0,
    start: int = 0,
    steps: int = 1000,
    every: int = 100,
    where: str = core.BLOCK_KERNELS,
    distribution: str = "uniform",
    group: str = "tensor",
) -> core.Transform:
    """Gradual magnitude pruning from `initial` to `sparsity` over `steps` fine-tuning steps.

    Args:
      sparsity, initial: the final and the initial sparsity (fractions in [0, 1), initial <= sparsity).
      start: the step of the first pruning update.
      steps: the schedule's length T in steps.
      every: steps between mask updates.
      where: path regex of the leaves to prune.
      distribution: "uniform" or "global".
      group: "tensor" or "output".

    Returns:
      A Transform whose `update` re-prunes at the schedule's steps; state {"masks", "sparsity"}.
    """
    final, initial = masks.check_sparsity(sparsity), masks.check_sparsity(initial, "initial sparsity")
    if initial > final:
        raise errors.UserError(f"initial sparsity {initial} exceeds the final sparsity {final}")
    for name, value in (("steps", steps), ("every", every)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise errors.UserError(f"gradual pruning needs a positive integer {name}, got {value!r}")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise errors.UserError(f"gradual pruning needs a non-negative integer start, got {start!r}")
    if distribution not in ("uniform", "global"):
        raise errors.UserError(f"gradual pruning supports uniform or global distributions, got {distribution!r}")
    masks.check_allocation(distribution, group, where)
    schedule = polynomial(initial, final, start, steps, every)

    def compute(params, sparsity):
        paths = core.select(params, where)
        m = masks.from_scores(magnitude.scores(params, paths), sparsity, distribution=distribution, group=group)
        return core.touched_tree(params, m)

    def init(params, key, calib):
        s0 = schedule(0)
        return {"masks": compute(params, float(s0)), "sparsity": jnp.asarray(s0, jnp.float32)}

    def apply(params, state):
        return core.apply_masks(params, state["masks"])

    def update(params, state, grads, step):
        due = (step >= start) & (step <= start + steps) & (((step - start) % every == 0) | (step == start + steps))
        target = schedule(step).astype(jnp.float32)

        def reprune(_):
            new = core.combine_masks(compute(apply(params, state), target), state["masks"])  # never regrow
            return {"masks": new, "sparsity": target}

        return jax.lax.cond(due & (target > state["sparsity"]), reprune, lambda _: state, None)

    return core.Transform(init, apply, update, lambda state: state["masks"])
