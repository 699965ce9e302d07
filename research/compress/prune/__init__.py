"""Pruning methods, one file each, every one a `core.Transform` whose state holds boolean masks.

    from research.compress.prune import magnitude
    t = magnitude.magnitude(0.5, distribution="global")
    t = research.compress.registry.make("magnitude", sparsity=0.5, distribution="global")   # by name (configs)

Methods: magnitude, random, snip (gradient x weight), wanda, sparsegpt, structured (heads and neurons, with a
`shrink` to a smaller dense model), and gradual (Zhu & Gupta's polynomial schedule during fine-tuning). Shared
machinery: `masks` (allocation: uniform, global, ERK; N:M patterns), `research.compress.calib` (calibration data
and the layer-by-layer walk).
"""
