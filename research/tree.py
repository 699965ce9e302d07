"""Paths over parameter pytrees.

Parameters are nested dicts (`layers` has int keys); a leaf's path is its keys joined by "/", e.g.
"layers/3/attn/q/kernel". Sharding rules and compression transforms select leaves by regex over these strings.
"""

from __future__ import annotations

import jax


def path_str(path) -> str:
    """A jax key path as "a/b/0/c" (`jax.tree_util.keystr` with simple keys)."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def flatten(tree) -> dict:
    """Maps each leaf's path string to the leaf, in tree order."""
    return {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def map_with_path(fn, tree, *rest):
    """Like jax.tree.map, but fn receives the leaf's path string first."""
    return jax.tree_util.tree_map_with_path(lambda p, *xs: fn(path_str(p), *xs), tree, *rest)
