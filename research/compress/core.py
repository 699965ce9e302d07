"""The compression core: a `Transform` is a set of pure functions over the parameter pytree, in the style of optax.

    t = prune.magnitude(0.5)                      # a Transform
    state = t.init(params, key, calib)            # masks, codebooks, scales...: arrays mirroring params
    effective = t.apply(params, state)            # what the forward pass sees (inside the jitted loss)
    state = t.update(params, state, grads, step)  # schedules, re-clustering; identity when static
    records = core.export(t, params, state)       # {path: code}: what the packer serialises (`research.codes`)

`chain(a, b)` composes transforms: `b` is initialised on and applied to `a`'s effective parameters. Which leaves
a method touches is a path regex over `research.tree` paths ("layers/3/attn/q/kernel"), resolved by `select`.

Per-leaf state trees mirror the parameter tree and hold `None` at the leaves a method leaves alone (as jaxpruner
does), so they flatten to just the touched leaves and shardings carry over from the parameters. Use
`map_touched` to combine such a tree with the parameters.

A transform says what its state is: `export` gives typed records (`research.codes`: a mask, grid codes with their
scales and zero points, palette indices with their tables) for the leaves it changed, so packing never guesses a
representation. Mask-only methods need not write one: their masks are exported as `codes.Masked`.

Gradient behaviour (tested): masked weights receive zero gradient through `apply` and `keep_masked` holds them at
exactly zero through any optax optimizer; `straight_through` gives estimators whose backward pass is the identity.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from research import codes, errors, tree

# Linear kernels inside the transformer blocks: the default target of every method.
BLOCK_KERNELS = r"layers/\d+/(attn|mlp)/\w+/kernel"


def _no_masks(state) -> None:
    return None


def _static_update(params, state, grads, step):
    return state


class Transform(NamedTuple):
    """A compression method as pure functions over the parameter pytree.

    Attributes:
      init: (params, key, calib) -> state. `calib` is a `calib.Calibration` or None.
      apply: (params, state) -> effective params, the tree the model runs with; traceable and differentiable.
      update: (params, state, grads, step) -> state, called after every optimizer step of fine-tuning.
      masks: state -> tree of boolean masks (None at unmasked leaves), or None when the method masks nothing.
        Fine-tuning holds the masked weights at exactly zero with `keep_masked`.
      learn: None, or (state, state_grads, step) -> state for methods whose state holds trained leaves (LSQ step
        sizes). With it, the train step differentiates the loss w.r.t. the state as well (`allow_int`: integer and
        boolean leaves get float0 gradients, to be ignored) and calls `learn` before `update`.
      export: (params, state) -> {path: code}, the `research.codes` records of the leaves the method changed,
        describing `apply(params, state)` there exactly; None: the masks as `codes.Masked` records (see `export`).
    """

    init: Callable
    apply: Callable
    update: Callable = _static_update
    masks: Callable = _no_masks
    learn: Callable | None = None
    export: Callable | None = None


def export(t: Transform, params, state) -> dict:
    """{path: record} of what `t` made of each leaf it changed (concrete arrays; call outside jit).

    Returns the transform's own `export`, or, for a method without one, its masks as `codes.Masked` records.
    """
    if t.export is not None:
        return t.export(params, state)
    m = t.masks(state)
    return {} if m is None else {p: codes.Masked(mask) for p, mask in touched(m).items()}


def chain(*transforms: Transform) -> Transform:
    """Composes transforms left to right; each sees the previous ones' effective parameters.

    The chained state is a tuple of the members' states (None: a member that touches no leaf, skipped by every
    function; `mixed` leaves the options no leaf chose so); `masks` is the elementwise AND of the members' masks;
    `export` composes the members' records leaf by leaf (`codes.compose`: a later member's record of a leaf
    replaces or refines an earlier one's).
    """

    def init(params, key, calib):
        states = []
        for i, t in enumerate(transforms):
            s = t.init(params, jax.random.fold_in(key, i), calib)
            params = t.apply(params, s)
            states.append(s)
        return tuple(states)

    def apply(params, state):
        for t, s in _live(transforms, state):
            params = t.apply(params, s)
        return params

    def update(params, state, grads, step):
        new = []
        for t, s in zip(transforms, state):
            if s is not None:
                s = t.update(params, s, grads, step)
                params = t.apply(params, s)
            new.append(s)
        return tuple(new)

    def masks(state):
        out = None
        for t, s in _live(transforms, state):
            m = t.masks(s)
            if m is not None:
                out = m if out is None else combine_masks(out, m)
        return out

    def learn(state, grads, step):
        return tuple(
            s if s is None or t.learn is None else t.learn(s, g, step) for t, s, g in zip(transforms, state, grads)
        )

    def export_fn(params, state):
        out: dict = {}
        for t, s in _live(transforms, state):
            new = export(t, params, s)
            after = t.apply(params, s)
            before_flat, after_flat = tree.flatten(params), tree.flatten(after)
            for path in [p for p in out if p not in new]:
                if not codes.same_bits(before_flat[path], after_flat[path]):
                    del out[path]  # re-valued by a member that says nothing about it: dense floats again
            for path, code in new.items():
                c = codes.compose(out.get(path), code)
                out[path] = c if c is code or codes.describes(c, after_flat[path]) else code
            params = after
        return out

    return Transform(init, apply, update, masks, learn if any(t.learn for t in transforms) else None, export_fn)


def _live(transforms, state):
    """(member, state) pairs of a chain's members that hold a state."""
    return [(t, s) for t, s in zip(transforms, state) if s is not None]


def select(params, pattern: str) -> list[str]:
    """Paths of the leaves whose path matches `pattern` (re.fullmatch), in tree order.

    Raises:
      UserError: the pattern is not a valid regex, or selects nothing (the message lists the available paths).
    """
    rx = check_pattern(pattern)
    paths = list(tree.flatten(params))
    chosen = [p for p in paths if rx.fullmatch(p)]
    if not chosen:
        shapes = list(dict.fromkeys(re.sub(r"^layers/\d+/", r"layers/\\d+/", p) for p in paths))
        raise errors.UserError(f"path pattern {pattern!r} selects no parameter; available: {', '.join(shapes)}")
    return chosen


def check_pattern(pattern: str) -> re.Pattern:
    """The compiled path regex; a UserError when it does not compile (factories call this when a method is built)."""
    try:
        return re.compile(pattern)
    except re.error as e:
        raise errors.UserError(f"path pattern {pattern!r} is not a valid regex: {e}") from None


def touched_tree(params, values: dict) -> Any:
    """A tree mirroring `params` with values[path] at the given paths and None everywhere else."""
    return tree.map_with_path(lambda p, _: values.get(p), params)


def touched(state_tree) -> dict:
    """{path: leaf} of a tree with None at untouched leaves (the None leaves are dropped)."""
    return tree.flatten(state_tree)


def map_touched(fn: Callable, state_tree, params, *rest) -> Any:
    """Maps fn(state_leaf, param, *rest_leaves) over the touched leaves; untouched leaves of `params` pass through."""
    return jax.tree.map(
        lambda s, p, *r: p if s is None else fn(s, p, *r), state_tree, params, *rest, is_leaf=lambda x: x is None
    )


def combine_masks(a, b):
    """Elementwise AND of two mask trees (None means "all kept")."""
    return jax.tree.map(
        lambda x, y: y if x is None else x if y is None else jnp.logical_and(x, y), a, b, is_leaf=lambda x: x is None
    )


def apply_masks(params, masks):
    """params with the masked-out weights set to zero (dtype kept)."""
    return map_touched(lambda m, p: jnp.where(m, p, jnp.zeros((), p.dtype)), masks, params)


def straight_through(fn: Callable, x):
    """fn(x) in the forward pass; the identity's gradient in the backward pass (x + stop_gradient(fn(x) - x))."""
    return x + jax.lax.stop_gradient(fn(x) - x)


class KeepMaskedState(NamedTuple):
    inner: Any


def keep_masked(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Wraps an optimizer so masked weights stay exactly zero, whatever the optimizer does.

    The wrapped update takes the current masks as an extra argument, `tx.update(grads, state, params, masks=m)`
    (None: no masking), so schedules that change the masks need no new optimizer. At masked positions the update
    becomes `-params` (the weight lands on exactly 0.0, however momentum or weight decay would have moved it);
    elsewhere it is the inner optimizer's update. The inner optimizer's state sees the masked gradients.
    """

    def init(params):
        return KeepMaskedState(tx.init(params))

    def update(updates, state, params=None, *, masks=None, **extra):
        if masks is not None:
            updates = map_touched(lambda m, g: jnp.where(m, g, jnp.zeros((), g.dtype)), masks, updates)
        new, inner = (
            tx.update(updates, state.inner, params, **extra) if extra else tx.update(updates, state.inner, params)
        )
        if masks is not None:
            if params is None:
                raise ValueError("keep_masked needs params to hold masked weights at zero")
            new = map_touched(lambda m, u, p: jnp.where(m, u, -p), masks, new, params)
        return new, KeepMaskedState(inner)

    return optax.GradientTransformationExtraArgs(init, update)
