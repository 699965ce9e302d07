"""Compression methods by name, for configs and the CLI (library code takes the factories themselves).

    t = registry.make("wanda", sparsity=0.5)
    t = registry.make("gptq", bits=4, granularity="group", group_size=128)

Every entry is a factory returning a `core.Transform`; its keyword arguments are the method's own (see each file).
"""

from __future__ import annotations

import importlib

from research import errors

# name -> (module under research.compress, factory); modules are imported on first use.
METHODS = {
    "magnitude": ("prune.magnitude", "magnitude"),
    "random": ("prune.random", "random"),
    "snip": ("prune.snip", "snip"),
    "gradual": ("prune.gradual", "gradual"),
    "wanda": ("prune.wanda", "wanda"),
    "sparsegpt": ("prune.sparsegpt", "sparsegpt"),
    "structured": ("prune.structured", "structured"),
    "codebook": ("share.codebook", "codebook"),
    "vq": ("share.vq", "vq"),
    "rtn": ("quant.rtn", "rtn"),
    "gptq": ("quant.gptq", "gptq"),
    "qat": ("quant.qat", "qat"),
    "cast": ("quant.cast", "cast"),
    "mixed": ("mixed", "mixed"),
}
# Methods whose init reads calibration data (structured only with score="taylor" or "activation", codebook and vq
# only with weighting="fisher").
CALIBRATED = {"snip", "wanda", "sparsegpt", "structured", "gptq", "mixed"}


def needs_calibration(spec: dict) -> bool:
    """Whether a compress entry {"method": ..., ...} reads calibration data."""
    if spec.get("method") == "structured":
        return spec.get("score", "magnitude") != "magnitude"
    if spec.get("method") in ("codebook", "vq"):
        return spec.get("weighting", "none") == "fisher"
    return spec.get("method") in CALIBRATED


def make(method: str, **kwargs):
    """The Transform of a method by name, with its keyword arguments; unknown names and arguments are UserErrors."""
    if method not in METHODS:
        raise errors.UserError(f"unknown compression method {method!r}; choose one of {', '.join(METHODS)}")
    module, factory = METHODS[method]
    fn = getattr(importlib.import_module(f"research.compress.{module}"), factory)
    try:
        return fn(**kwargs)
    except TypeError as e:
        raise errors.UserError(f"compression method {method!r}: {e}") from None
