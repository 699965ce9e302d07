"""The loss and the jitted train step over split state.

The training state is a plain dict {"step": int32, "params": ..., "opt_state": ...}. The step merges the graphdef
with the parameters inside the traced function (no `nnx.jit`), takes one optimizer step, and donates the old state's
buffers. Dropout keys are `fold_in(key(seed), step)`, so a step's randomness depends only on the seed and the step.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from research.models import loss as loss_lib

# The loss lives in `models.loss` so that eval, calibration and compression share it; re-exported for training code.
token_nll = loss_lib.token_nll
loss_fn = loss_lib.loss_fn


def init_state(params, tx) -> dict:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def abstract_state(params, tx) -> dict:
    """The training state's structure as ShapeDtypeStructs, for (abstract) params; allocates nothing."""
    return jax.eval_shape(lambda p: init_state(p, tx), params)


def make_train_step(
    graphdef,
    tx,
    *,
    seed: int,
    dropout: bool,
    state_shardings=None,
    batch_sharding=None,
    apply_fn: Callable | None = None,
    transform=None,
):
    """Builds the jitted step: (state, batch) -> (new state, {"loss", "grad_norm"}).

    Args:
      graphdef: the model's graphdef.
      tx: the optax optimizer.
      seed: run seed; dropout keys derive from it and the step.
      dropout: whether to pass dropout keys to the model.
      state_shardings: shardings of the state tree (None: let jit infer from the inputs).
      batch_sharding: sharding of each batch array.
      apply_fn: see `loss_fn`.
      transform: a compression `core.Transform` to fine-tune under: the state then has a "compress" entry, the
        forward pass sees `transform.apply(params, state["compress"])`, masks go to the optimizer (which must be
        wrapped in `core.keep_masked` when the transform masks), `transform.learn` (when set) takes a step on the
        state's trained leaves with their gradients, and `transform.update` runs after each step.
    """
    key = jax.random.key(seed)
    if transform is not None and apply_fn is not None:
        raise ValueError("give apply_fn or transform, not both")

    def step(state, batch):
        rng = jax.random.fold_in(key, state["step"]) if dropout else None
        cstate = state.get("compress")
        if transform is not None and transform.learn is not None:  # trained state leaves: differentiate them too
            loss, (grads, sgrads) = jax.value_and_grad(
                lambda p, s: loss_fn(p, graphdef, batch, rng, lambda q: transform.apply(q, s)),
                argnums=(0, 1),
                allow_int=True,
            )(state["params"], cstate)
            cstate = transform.learn(cstate, sgrads, state["step"] + 1)
        else:
            fn = apply_fn if transform is None else (lambda p: transform.apply(p, cstate))
            loss, grads = jax.value_and_grad(loss_fn)(state["params"], graphdef, batch, rng, fn)
        masks = None if transform is None else transform.masks(cstate)
        if masks is None:
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        else:
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"], masks=masks)
        params = optax.apply_updates(state["params"], updates)
        new = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
        if transform is not None:
            new["compress"] = transform.update(params, cstate, grads, new["step"])
        return new, {"loss": loss, "grad_norm": optax.global_norm(grads)}

    if state_shardings is None:
        return jax.jit(step, donate_argnums=0)
    batch_sh = {"inputs": batch_sharding, "targets": batch_sharding}
    return jax.jit(
        step, in_shardings=(state_shardings, batch_sh), out_shardings=(state_shardings, None), donate_argnums=0
    )
