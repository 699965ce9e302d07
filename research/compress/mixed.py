"""Mixed precision under a size budget: every leaf gets the candidate compression that costs the least measured
loss while the packed file fits the budget (a multiple-choice knapsack, as in HAWQ-V3's ILP), or, with a loss
budget, the smallest packed file whose predicted loss increase fits it.

    t = mixed([dict(method="rtn", bits=b) for b in (2, 3, 4, 8)], budget_bits_per_weight=3.0)
    t = mixed([...], max_loss_increase=0.01)   # nats per token: the smallest file within it
    state = t.init(params, key, calib)      # calibration data: the sensitivities are measured on it

`init` runs in three passes:
1. Every option (a compress entry: {"method": ..., **arguments}, with its own `where` or the mixed one's) is
   initialised on the original parameters, once for all the leaves it may compress.
2. Per (leaf, option): the packed bytes of the leaf as that option leaves it (`coding.pack.encode_leaf` of its
   exported record: the bytes the file will hold, entropy coding included) and its sensitivity, the increase of
   the next-token loss when that leaf alone is compressed so:
     "loss"    measured: the calibration loss with the one leaf replaced, minus the dense loss (one forward pass
               over the calibration windows per leaf and option);
     "fisher"  estimated, 0.5 * sum F (w' - w)^2 with F the diagonal empirical Fisher (`calib.fisher`; one
               backward pass in all), the second-order estimate of HAWQ / SqueezeLLM. F comes from gradients of
               whole windows (their mean over the window's tokens), not of single tokens, so its scale falls short
               by up to the window length: on SmolLM2 (4-bit Q4_1 -> 3-bit blocks, 512-token windows) it predicted
               0.0048 nats per token where the measured increase was 1.51. It ranks leaves (byte budgets) but is no
               loss: a loss budget (`max_loss_increase`) needs "loss".
3. The allocation: minimise the summed sensitivities subject to (bytes of the chosen options + the bytes of every
   leaf no option touches, packed as they are + the header) <= the budget, one option per leaf, solved exactly as
   an integer program (`scipy.optimize.milp`, HiGHS); with `max_loss_increase`, minimise the bytes subject to
   the summed sensitivities <= it (the same program, objective and constraint swapped).
The budget is the whole file's: `budget_bytes`, or `budget_bits_per_weight` x every parameter of the model / 8.
The header's bytes are estimated (the leaf records, compressed) plus `reserve_bytes` for the file's metadata (the
`compress` job fills in what its metadata takes), so the packed file lands within a few hundred bytes of the
estimate; the job reports the packed size against the budget.

State: {"members": (each option's state, kept only at the leaves it was given; None elsewhere), "sensitivity":
(L, O) float32, "bytes": (L, O) int32 (-1 where the option does not apply), "choice": (L,) int32}, with the L
leaves in sorted path order (`report` names them). `apply`, `update`, `learn`, `masks` and `export` are the
options' own, as `core.chain` composes them over disjoint leaves; fine-tuning under the mix trains each leaf as
its option does (QAT options re-fit their grids, codebook entries train).

What is approximate: sensitivities are measured one leaf at a time (their sum ignores interactions), and a
calibrated option (GPTQ) compresses each leaf with the others compressed by that same option, as its own run would.
"""

from __future__ import annotations

import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from research import codes, errors, tree
from research.compress import calib as calib_lib
from research.compress import core, registry
from research.models import loss as loss_lib

SENSITIVITIES = ("loss", "fisher")


def mixed(
    options,
    *,
    budget_bits_per_weight: float | None = None,
    budget_bytes: int | None = None,
    max_loss_increase: float | None = None,
    where: str = core.BLOCK_KERNELS,
    sensitivity: str = "loss",
    reserve_bytes: int = 0,
    progress: bool | None = None,
) -> core.Transform:
    """Per-leaf choice among compression options under a byte budget (see the module docstring).

    Args:
      options: compress entries ({"method": name, **arguments}), each a candidate for the leaves its `where`
        (default: this `where`) selects; every selected leaf needs at least one.
      budget_bits_per_weight: the packed file's size as bits per parameter of the whole model.
      budget_bytes: the packed file's size in bytes.
      max_loss_increase: instead of a size, the summed sensitivities (nats per token of calibration loss) the
        smallest allocation may reach (give exactly one of the three budgets).
      where: path regex of the leaves to allocate.
      sensitivity: "loss" (measured per leaf and option) or "fisher" (the diagonal-Fisher estimate).
      reserve_bytes: bytes of the budget held back for the file's metadata.
      progress: show progress bars (None: on a terminal).

    Returns:
      A `core.Transform` (calibration data required).
    """
    if not isinstance(options, list | tuple) or not options:
        raise errors.UserError("mixed needs a non-empty list of options ({'method': name, ...} entries)")
    specs = []
    for o in options:
        o = dict(o) if hasattr(o, "items") else o  # configs give ConfigDicts
        if not isinstance(o, dict) or "method" not in o or o["method"] == "mixed":
            raise errors.UserError(f"a mixed option must be a {{'method': name, ...}} entry (not mixed), got {o!r}")
        specs.append({"where": where, **o})
    members = [registry.make(**s) for s in specs]  # every option checked here, before any work
    budgets = dict(
        budget_bits_per_weight=budget_bits_per_weight, budget_bytes=budget_bytes, max_loss_increase=max_loss_increase
    )
    if sum(v is not None for v in budgets.values()) != 1:
        raise errors.UserError(f"mixed needs exactly one of {', '.join(k + '=' for k in budgets)}")
    for name, v in budgets.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not np.isfinite(v)):
            raise errors.UserError(f"{name} must be a number, got {v!r}")
        if v is not None and name != "max_loss_increase" and not v > 0:
            raise errors.UserError(f"{name} must be positive, got {v!r}")
    if sensitivity not in SENSITIVITIES:
        raise errors.UserError(f"sensitivity must be one of {SENSITIVITIES}, got {sensitivity!r}")
    if sensitivity == "fisher" and max_loss_increase is not None:
        raise errors.UserError(
            "a loss budget needs measured sensitivities (sensitivity='loss'): the Fisher estimate ranks leaves but its "
            "scale is not a loss (see the mixed module docstring)"
        )
    if isinstance(reserve_bytes, bool) or not isinstance(reserve_bytes, int) or reserve_bytes < 0:
        raise errors.UserError(f"reserve_bytes must be a non-negative integer, got {reserve_bytes!r}")
    core.check_pattern(where)

    def init(params, key, calib):
        calib = calib_lib.require(calib, "mixed (its sensitivities)")
        flat = tree.flatten(params)
        leaves = core.select(params, where)
        n_params = sum(int(np.size(x)) for x in flat.values())
        budget = budget_bytes if budget_bytes is not None else (budget_bits_per_weight or np.inf) * n_params / 8
        t0 = time.time()
        states, tables = [], []
        for i, s in enumerate(specs):
            chosen = [p for p in core.select(params, s["where"]) if p in leaves]
            if not chosen:
                states.append(None)
                tables.append({})
                continue
            t = registry.make(**{**s, "where": "|".join(map(re.escape, chosen))})
            st = t.init(params, jax.random.fold_in(key, i), calib)
            effective = tree.flatten(jax.tree.map(np.asarray, t.apply(params, st)))
            records = codes.to_numpy(core.export(t, params, st))
            tables.append({p: (effective[p], records.get(p)) for p in chosen})
            states.append(st)
        missing = [p for p in leaves if not any(p in tb for tb in tables)]
        if missing:
            raise errors.UserError(f"mixed: no option applies to {missing[0]} (and {len(missing) - 1} more)")
        sizes, sens, encoded = _measure(params, leaves, tables, calib, sensitivity, progress)
        t_measure = time.time() - t0
        fixed, header = _fixed_bytes(flat, encoded)
        available = budget - fixed - header - reserve_bytes
        t1 = time.time()
        choice = allocate(sens, sizes, available, leaves, budget, max_loss_increase)
        t_alloc = time.time() - t1
        picked = {p: int(c) for p, c in zip(leaves, choice)}
        names = set(flat)
        kept = tuple(_restrict(st, {p for p in leaves if picked[p] == i}, names) for i, st in enumerate(states))
        return {
            "members": kept,
            "sensitivity": jnp.asarray(sens, jnp.float32),
            "bytes": jnp.asarray(sizes, jnp.int32),
            "choice": jnp.asarray(choice, jnp.int32),
            "seconds": jnp.asarray([t_measure, t_alloc], jnp.float32),
            "budget": jnp.asarray([budget, fixed + header + reserve_bytes], jnp.float32),
        }

    chain = core.chain(*members)  # over disjoint leaves; an option no leaf chose holds None and is skipped

    def apply(params, state):
        return chain.apply(params, state["members"])

    def update(params, state, grads, step):
        return {**state, "members": chain.update(params, state["members"], grads, step)}

    def learn(state, grads, step):
        return {**state, "members": chain.learn(state["members"], grads["members"], step)}

    def masks(state):
        return chain.masks(state["members"])

    def export(params, state):
        return chain.export(params, state["members"])

    return core.Transform(init, apply, update, masks, learn if chain.learn else None, export)


def _measure(params, leaves, tables, calib, sensitivity, progress):
    """(bytes (L, O) int, -1 where an option does not apply; sensitivity (L, O) float, +inf there; {leaf: (record,
    sections)} as its first applicable option packs it, for the header estimate)."""
    from research.coding import pack

    n_opt = len(tables)
    sizes = np.full((len(leaves), n_opt), -1, np.int64)
    sens = np.full((len(leaves), n_opt), np.inf)
    flat = tree.flatten(params)
    fisher = None
    if sensitivity == "fisher":
        fisher = tree.flatten(calib_lib.fisher(calib, params))
    else:
        loss = jax.jit(lambda p, b: loss_lib.loss_fn(p, calib.graphdef, b))
        batches = [{"inputs": b[:, :-1], "targets": b[:, 1:]} for b in calib.batches()]
        weights = np.asarray([b["inputs"].shape[0] for b in batches], np.float64)
        params_dev = calib.replicate(params)

        def calib_loss(p):
            return float(np.dot([float(loss(p, b)) for b in batches], weights) / weights.sum())

        dense = calib_loss(params_dev)
    encoded: dict = {}
    jobs = [(li, oi) for li, p in enumerate(leaves) for oi in range(n_opt) if p in tables[oi]]
    for li, oi in tqdm(jobs, desc="mixed: sensitivity", disable=None if progress is None else not progress):
        p = leaves[li]
        value, record = tables[oi][p]
        rec, sections = pack.encode_leaf(p, value, record)
        sizes[li, oi] = sum(map(len, sections.values()))
        encoded.setdefault(p, (rec, sections))
        if fisher is not None:
            d = value.astype(np.float64) - np.asarray(flat[p], np.float64)
            sens[li, oi] = 0.5 * float(np.sum(np.asarray(fisher[p], np.float64) * d * d))
        else:
            swapped = tree.map_with_path(lambda q, x, p=p, v=value: jnp.asarray(v) if q == p else x, params_dev)
            sens[li, oi] = calib_loss(calib.replicate(swapped)) - dense
    return sizes, sens, encoded


def _fixed_bytes(flat, encoded: dict):
    """(packed section bytes of the leaves no option touches, the file's other bytes: framing and the header with
    every allocated leaf's record as `encoded` holds it, metadata aside)."""
    from research.coding import container, pack

    fixed, records, blobs = 0, [], []
    for p, x in flat.items():
        rec, sections = encoded[p] if p in encoded else pack.encode_leaf(p, np.asarray(x))
        if p not in encoded:
            fixed += sum(map(len, sections.values()))
        records.append(rec)
        blobs.append(sections)
    return fixed, container.overhead({}, records, blobs)


def allocate(sens, sizes, available: float, leaves, budget: float, max_loss: float | None = None) -> np.ndarray:
    """The option per leaf minimising the summed sensitivity with the summed bytes <= available, or (`max_loss`)
    minimising the summed bytes with the summed sensitivity <= max_loss (an exact multiple-choice knapsack by
    integer programming).

    Args:
      sens: (L, O) sensitivities (+inf where an option does not apply).
      sizes: (L, O) bytes (-1 where it does not apply).
      available: bytes the allocated leaves may take (inf: no size bound).
      leaves, budget: for the message when no allocation fits.
      max_loss: the loss budget, or None.

    Returns:
      (L,) int option indices.
    """
    from scipy import optimize

    ok = (sizes >= 0) & np.isfinite(sens)  # an option whose loss is not finite is not a choice
    if not ok.any(axis=1).all():
        bad = leaves[int(np.flatnonzero(~ok.any(axis=1))[0])]
        raise errors.UserError(f"mixed: every option gives {bad} a non-finite loss; add an option with more bits")
    smallest = np.where(ok, sizes, np.iinfo(np.int64).max).min(axis=1).astype(np.float64)
    if smallest.sum() > available:
        short = smallest.sum() - available
        raise errors.UserError(
            f"mixed: the budget of {budget:,.0f} bytes is {short:,.0f} bytes short of the smallest allocation "
            f"(every leaf at its smallest option); raise the budget or add options with fewer bits"
        )
    n_l, n_o = sizes.shape
    idx = np.flatnonzero(ok.ravel())  # one variable per applicable (leaf, option)
    rows = idx // n_o
    s = np.asarray(sens, np.float64).ravel()[idx]
    b = np.asarray(sizes, np.float64).ravel()[idx]
    one = np.zeros((n_l, idx.size))
    one[rows, np.arange(idx.size)] = 1.0
    if max_loss is not None:
        least = np.where(ok, sens, np.inf).min(axis=1).sum()
        if least > max_loss:
            raise errors.UserError(
                f"mixed: even the most accurate option per leaf predicts a loss increase of {least:.4g} nats/token, "
                f"above max_loss_increase={max_loss:g}; raise it or add options with more bits"
            )
        cost, bound = b, optimize.LinearConstraint(s[None], -np.inf, max_loss)
    else:
        cost, bound = s, optimize.LinearConstraint(b[None], -np.inf, available)
    res = optimize.milp(
        c=cost,
        integrality=np.ones(idx.size),
        bounds=optimize.Bounds(0, 1),
        constraints=[optimize.LinearConstraint(one, 1, 1), bound],
    )
    if res.x is None:
        raise errors.UserError(f"mixed: the allocation found no solution ({res.message})")
    x = np.round(res.x).astype(bool)
    choice = np.full(n_l, -1)
    choice[rows[x]] = idx[x] % n_o
    assert (choice >= 0).all(), "every leaf has an option"
    return choice


def _restrict(state, keep: set, params: set):
    """An option's state with None at every parameter leaf not in `keep` (the leaves of any subtree whose path
    ends with a parameter's path: the mirrored trees of codes, scales, masks, optimizer moments); None when the
    option keeps no leaf."""
    if state is None or not keep:
        return None

    def one(path, x):
        parts = tree.path_str(path).split("/")
        for i in range(len(parts)):
            leaf = "/".join(parts[i:])
            if leaf in params:
                return x if leaf in keep else None
        return x  # not a per-leaf array (a step count, a hyperparameter)

    return jax.tree_util.tree_map_with_path(one, state)


def report(spec: dict, params, state) -> dict:
    """The allocation of a mixed state as JSON-able data: the budget, the seconds of the measuring and allocating
    passes, and per leaf (in allocation order) the chosen option with its bytes and sensitivity and every
    option's.

    Args:
      spec: the mixed entry ({"method": "mixed", "options": [...], "where": ...}).
      params: the parameters it was initialised on (for the leaf paths).
      state: its state.
    """
    leaves = core.select(params, spec.get("where", core.BLOCK_KERNELS))
    sens, sizes, choice = (np.asarray(state[k]) for k in ("sensitivity", "bytes", "choice"))
    budget, fixed = (float(x) for x in np.asarray(state["budget"]))
    measure, alloc = (float(x) for x in np.asarray(state["seconds"]))
    rows = [
        dict(
            leaf=p,
            option=int(c),
            bytes=int(sizes[i, c]),
            sensitivity=float(sens[i, c]),
            options_bytes=[int(b) for b in sizes[i]],
            options_sensitivity=[float(x) if np.isfinite(x) else None for x in sens[i]],
        )
        for i, (p, c) in enumerate(zip(leaves, choice))
    ]
    counts = np.bincount(choice, minlength=sizes.shape[1])
    return dict(
        options=[{k: v for k, v in dict(o).items()} for o in spec["options"]],
        budget_bytes=budget if np.isfinite(budget) else None,
        max_loss_increase=spec.get("max_loss_increase"),
        other_bytes=fixed,
        allocated_bytes=int(sum(r["bytes"] for r in rows)),
        leaves_per_option=[int(n) for n in counts],
        predicted_loss_increase=float(sum(r["sensitivity"] for r in rows)),
        seconds=dict(measure=measure, allocate=alloc),
        leaves=rows,
    )
