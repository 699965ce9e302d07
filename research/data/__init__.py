"""Data: corpora by name, tokenizers, cached token splits and a seeded batch sampler."""

from research.data import corpora, dataset, tokenizers  # noqa: F401  (re-exported modules)
