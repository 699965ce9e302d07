"""Training: optimizer, jitted step, sharding rules, orbax checkpoints and the loop."""

from research.train import checkpoint, loop, optim, step  # noqa: F401  (re-exported modules)
