"""ziplm: compressing autoregressive language models, and compressing data with them (JAX/Flax NNX)."""

__version__ = "0.1.0"
