"""Pruning methods, one file each, every one a `core.Transform` whose state holds boolean masks.

    from research.compress import prune
    t = prune.make("wanda", sparsity=0.5)          # by name (configs, CLI)
    from research.compress.prune import magnitude
    t = magnitude.magnitude(0.5, distribution="global")

Methods: magnitude, random, snip (gradient x weight), wanda, sparsegpt, structured (heads and neurons, with a
`shrink` to a smaller dense model), and gradual (Zhu & Gupta's polynomial schedule during fine-tuning). Shared
machinery: `masks` (allocation: uniform, global, ERK; N:M patterns), `research.compress.calib` (calibration data
and the layer-by-layer walk).
"""

from __future__ import annotations

import importlib

from research import errors

# name -> (module, factory): imported on first use.
METHODS = {
    "magnitude": ("magnitude", "magnitude"),
    "random": ("random", "random"),
    "snip": ("snip", "snip"),
    "gradual": ("gradual", "gradual"),
    "wanda": ("wanda", "wanda"),
    "sparsegpt": ("sparsegpt", "sparsegpt"),
    "structured": ("structured", "structured"),
}


# Methods whose init reads calibration data (structured only with score="taylor" or "activation").
CALIBRATED = {"snip", "wanda", "sparsegpt", "structured"}


def needs_calibration(spec: dict) -> bool:
    """Whether a compress entry {"method": ..., ...} reads calibration data."""
    if spec.get("method") == "structured":
        return spec.get("score", "magnitude") != "magnitude"
    return spec.get("method") in CALIBRATED


def make(method: str, **kwargs):
    """The Transform of a pruning method by name, with its keyword arguments; unknown names are UserErrors."""
    if method not in METHODS:
        raise errors.UserError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")
    module, factory = METHODS[method]
    fn = getattr(importlib.import_module(f"research.compress.prune.{module}"), factory)
    try:
        return fn(**kwargs)
    except TypeError as e:
        raise errors.UserError(f"pruning method {method!r}: {e}") from None
