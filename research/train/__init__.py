"""Training: optimizer, jitted step, sharding rules, orbax checkpoints and the loop."""

from research.train import checkpoint, loop, optim, sharding, step  # noqa: F401  (re-exported modules)
