"""Evaluation: loss, perplexity, bits per byte and accuracy under named window protocols."""

from research.eval import metrics  # noqa: F401  (re-exported module)
