"""A sweep config and the points it declares: axes of overrides, their product and zips, each point's name.

A sweep config is a Python file whose `get_config()` returns (see research/sweep/__init__.py for the whole format)

    name   = "prune"                        # W&B group and the default directory runs/sweeps/<name>
    job    = "compress"                     # train | compress | eval | encode
    base   = <the job's config>             # a ConfigDict, or "path/to/config.py[:arg]"
    axes   = [{"compress.0.method": ["magnitude", "wanda"]},                 # one group: its lists are zipped
              {"compress.0.sparsity": [0.3, 0.5], "finetune.steps": [0, 200]},
              [{"label": "2:4", "compress.0.pattern": "2:4"}, {...}]]        # or a list of override sets
    extra  = [{"label": "dense + ft", "compress.0.sparsity": 0.0}]          # optional points outside the product
    collect, plot, wandb                    # research/sweep/table.py, research/sweep/runner.py

The points are the product over groups of each group's options. Within a dict group the lists are zipped (they
must have one length); a list group is a list of override dicts, each one option (heterogeneous points: a whole
`compress` list per option). A point's name joins its options' parts: an option's "label" when it has one, else
`key=value` for each of its overrides, where key is the last dotted component (the full key where that would be
ambiguous) and a list or dict value is shown by a short hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re

import ml_collections as mlc

from research import config as config_lib
from research import errors

JOBS = ("train", "compress", "eval", "encode")
MAX_NAME = 120


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of a sweep.

    Attributes:
      index: position in the sweep's order; name: its directory name; overrides: {dotted key: value};
      labels: {column: label} for the options that had a "label" (column "label", or "label<i>" for group i
        where several groups have labels).
    """

    index: int
    name: str
    overrides: dict
    labels: dict


def load(path: str, overrides: list[str] | None = None) -> mlc.ConfigDict:
    """The sweep config of `path` (`file.py[:arg]`) with command-line overrides (`--config.base.model=X`),
    checked."""
    cfg = config_lib.load(path)
    if overrides:
        config_lib.apply_overrides(cfg, overrides)
    check(cfg, path)
    return cfg


def check(cfg: mlc.ConfigDict, path: str = "the sweep config") -> None:
    for key in ("name", "job", "axes"):
        if key not in cfg:
            raise errors.UserError(f"{path} has no '{key}' entry (a sweep config needs name, job, base and axes)")
    if cfg.job not in JOBS:
        raise errors.UserError(f"{path}: job must be one of {', '.join(JOBS)}, got {cfg.job!r}")
    if not re.fullmatch(r"[\w.+-]+", str(cfg.name)):
        raise errors.UserError(f"{path}: name {cfg.name!r} must be letters, digits and . _ + - (it names a directory)")
    of(cfg)  # every axis checked before anything runs


def _options(group, i: int) -> list[tuple[str | None, dict]]:
    """A group as its options: [(label or None, {key: value})]."""
    if isinstance(group, dict | mlc.ConfigDict):
        group = dict(group)
        if not group:
            raise errors.UserError(f"axes[{i}] is empty")
        lengths = {k: len(v) for k, v in group.items() if isinstance(v, list | tuple)}
        if len(lengths) != len(group):
            bad = next(k for k in group if k not in lengths)
            raise errors.UserError(f"axes[{i}]['{bad}'] must be a list of values (got {group[bad]!r})")
        if len(set(lengths.values())) != 1:
            raise errors.UserError(f"axes[{i}] zips lists of different lengths {lengths}: give them one length")
        n = next(iter(lengths.values()))
        return [(None, {k: _plain(v[j]) for k, v in group.items()}) for j in range(n)]
    if isinstance(group, list | tuple):
        out = []
        for j, option in enumerate(group):
            if not isinstance(option, dict | mlc.ConfigDict):
                raise errors.UserError(f"axes[{i}][{j}] must be a dict of overrides, got {option!r}")
            option = {k: _plain(v) for k, v in dict(option).items()}
            label = option.pop("label", None)
            out.append((None if label is None else str(label), option))
        if not out:
            raise errors.UserError(f"axes[{i}] is empty")
        return out
    raise errors.UserError(f"axes[{i}] must be a dict of lists (zipped) or a list of override dicts, got {group!r}")


def _plain(v):
    """A value from a config as plain Python (ConfigDicts inside lists become dicts)."""
    if isinstance(v, mlc.ConfigDict):
        return {k: _plain(x) for k, x in v.to_dict().items()}
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v


def of(cfg: mlc.ConfigDict) -> list[Point]:
    """The points of a sweep config: its axes' product, then its `extra` points (controls, baselines)."""
    return points(cfg.axes, cfg.get("extra") or ())


def points(axes, extra=()) -> list[Point]:
    """The points of `axes` in order (the first group varies slowest), then one point per option of `extra` (a
    list of override dicts like a list group, outside the product: a control or a baseline).

    Raises:
      UserError: a malformed group, a key set by two groups, or two points with one name.
    """
    if not isinstance(axes, list | tuple):
        raise errors.UserError(f"axes must be a list of groups, got {type(axes).__name__}")
    groups = [_options(g, i) for i, g in enumerate(axes)]
    keys_of = [set().union(*(o for _, o in g)) for g in groups]
    for (i, a), (j, b) in itertools.combinations(enumerate(keys_of), 2):
        if a & b:
            raise errors.UserError(f"axes[{i}] and axes[{j}] both set {sorted(a & b)}: put them in one group")
    every = sorted(set().union(*keys_of)) if keys_of else []
    labelled = [i for i, g in enumerate(groups) if any(label is not None for label, _ in g)]
    short = _short_keys(every)
    out = []
    for index, combo in enumerate(itertools.product(*groups)):
        overrides, labels, parts = {}, {}, []
        for i, (label, option) in enumerate(combo):
            overrides.update(option)
            if label is not None:
                labels["label" if len(labelled) == 1 else f"label{i}"] = label
                parts.append(label)
            else:
                parts.append(",".join(f"{short[k]}={show(v)}" for k, v in option.items()))
        out.append(Point(index, _dirname(",".join(p for p in parts if p) or "base"), overrides, labels))
    for label, option in _options(list(extra), len(groups)) if extra else ():
        name = label if label is not None else ",".join(f"{k}={show(v)}" for k, v in option.items()) or "base"
        out.append(Point(len(out), _dirname(name), option, {"label": label} if label is not None else {}))
    seen = {}
    for p in out:
        if p.name in seen:
            raise errors.UserError(
                f"points {seen[p.name]} and {p.index} are both named {p.name!r}: give their options labels"
            )
        seen[p.name] = p.index
    return out


def _short_keys(keys: list[str]) -> dict[str, str]:
    last = {k: k.rsplit(".", 1)[-1] for k in keys}
    counts = {}
    for v in last.values():
        counts[v] = counts.get(v, 0) + 1
    return {k: (last[k] if counts[last[k]] == 1 else k) for k in keys}


def column(key: str, keys: list[str]) -> str:
    """The table column of override `key` among all the sweep's keys (its short name unless ambiguous)."""
    return _short_keys(sorted(set(keys) | {key}))[key]


def show(v) -> str:
    if isinstance(v, list | dict):
        return "h" + hashlib.sha1(json.dumps(v, sort_keys=True).encode()).hexdigest()[:8]
    if isinstance(v, float):
        return format(v, "g")
    return str(v)


def _dirname(name: str) -> str:
    name = re.sub(r"[^\w.,=+:%@-]+", "-", name).strip("-.") or "point"
    if len(name) > MAX_NAME:
        name = name[: MAX_NAME - 9] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return name


def describe(v) -> str:
    """An override value as one short line (for the dry run)."""
    text = json.dumps(v) if isinstance(v, list | dict) else str(v)
    return text if len(text) <= 60 else text[:57] + "..."
