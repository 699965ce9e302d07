"""The inverse-Hessian factor that the layer-wise solvers (SparseGPT, GPTQ) share."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from research import errors

_RETRIES = 3
log = logging.getLogger(__name__)


@jax.jit
def _upper_factor(h, percdamp):
    """Upper Cholesky factor U of the dampened H^-1 (U^T U = H^-1), after giving dead inputs a unit diagonal.

    h: (in, in) -> (in, in) U, NaN when the dampened Hessian is not positive definite.
    """
    eye = jnp.eye(h.shape[0], dtype=jnp.float32)
    h = h + jnp.diag((jnp.diag(h) == 0).astype(jnp.float32))
    lower = jnp.linalg.cholesky(h + percdamp * jnp.mean(jnp.diag(h)) * eye)
    hinv = jax.scipy.linalg.cho_solve((lower, True), eye)  # (in, in)
    return jnp.linalg.cholesky(hinv).T


def inverse_factor(h, percdamp: float, name: str, method: str):
    """The upper Cholesky factor U of the dampened inverse Hessian (U^T U = H^-1), as SparseGPT and GPTQ use it.

    Dead inputs (zero diagonal) get a unit diagonal; the damping is percdamp * mean(diag H). When the dampened
    Hessian is not positive definite, the damping is retried at 10x (at least 1e-3), up to 3 times, with a logged
    warning naming the layer; then a UserError.

    Args:
      h: (in, in) X^T X of the layer's calibration inputs.
      percdamp: relative damping (0.01 in the papers).
      name: the layer, for messages; method: the calling method, for messages.

    Returns:
      (in, in) upper triangular U.
    """
    tried = []
    for attempt in range(_RETRIES + 1):
        u = _upper_factor(h, percdamp)
        if bool(jnp.all(jnp.isfinite(u))):
            if attempt:
                log.warning(
                    "%s: the Hessian of %s is not positive definite with percdamp %g; used percdamp %g",
                    method,
                    name,
                    tried[0],
                    percdamp,
                )
            return u
        tried.append(percdamp)
        percdamp = max(10 * percdamp, 1e-3)
    raise errors.UserError(
        f"{method}: the Hessian of {name} is not positive definite even with percdamp {tried[-1]:g} "
        f"(mean diagonal {float(jnp.mean(jnp.diag(h))):g}); check the calibration inputs"
    )
