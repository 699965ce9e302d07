"""Model compression as pure transforms over the parameter pytree (see `core`): pruning (`prune`) first."""
