"""Run configuration: Python files with `get_config()`, command-line overrides, and checks.

A config is an `ml_collections.ConfigDict` holding every setting of a run, the seed included. `base_config()` is
the demo's setting and the starting point of the files in `experiments/configs/`. On the command line,

    ziplm train --config experiments/configs/shakespeare_char_cpu.py --config.train.lr=3e-4

loads the file, calls its `get_config()` (or `get_config(arg)` for `file.py:arg`), and applies the overrides. An
override of an unknown key, or of a value with the wrong type, is a one-line error.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
from pathlib import Path

import ml_collections as mlc

from research import errors
from research.models import config as model_config


def base_config() -> mlc.ConfigDict:
    """The default run: a small GPT-2-style byte-level model on the embedded pydoc corpus (the demo)."""
    c = mlc.ConfigDict()
    c.seed = 0
    c.model = dataclasses.asdict(
        model_config.gpt2_style(vocab_size=256, n_layer=4, n_head=4, d_model=128, max_seq_len=128, bias=False)
    )
    c.data = dict(corpus="pydoc", tokenizer="byte", val_fraction=0.1, seq_len=128, batch_size=16, sampling="random")
    c.train = dict(
        steps=600,
        lr=2e-3,
        min_lr=2e-4,
        warmup_steps=100,
        weight_decay=0.1,
        b1=0.9,
        b2=0.99,
        grad_clip=1.0,
        log_every=10,
        eval_every=200,
        ckpt_every=200,
        keep_checkpoints=2,
    )
    # Evaluation windows: `window` tokens of context, a new window every `stride` tokens (None: the training
    # seq_len, and stride = window, i.e. non-overlapping windows). `max_windows` caps the periodic evaluation.
    c.eval = dict(window=None, stride=None, batch_size=32, max_windows=None)
    # Device mesh: axis sizes (-1 takes the remaining devices) and the parameter sharding rules
    # ("replicated", "fsdp" or "tensor"; see research/train/sharding.py).
    c.mesh = dict(data=-1, model=1, rules="fsdp")
    # W&B: "offline" (default; writes under the run directory, no network), "online", or "disabled".
    # The environment variable WANDB_MODE, when set, takes precedence.
    c.wandb = dict(mode="offline", project="ziplm", entity=None, name=None)
    return c


def load(path: str) -> mlc.ConfigDict:
    """Loads `path` or `path:arg` and returns its get_config() (or get_config(arg))."""
    file, _, arg = path.partition(":")
    p = Path(file)
    if not p.is_file():
        raise errors.UserError(f"config file {p} does not exist")
    spec = importlib.util.spec_from_file_location(f"_ziplm_config_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise errors.UserError(f"config file {p} defines no get_config()")
    cfg = module.get_config(arg) if arg else module.get_config()
    if not isinstance(cfg, mlc.ConfigDict):
        cfg = mlc.ConfigDict(cfg)
    return cfg


def parse_value(text: str):
    """A command-line value as a Python literal when it parses as one, else as the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _keys(cfg: mlc.ConfigDict, prefix: str = "") -> list[str]:
    out = []
    for k, v in cfg.items():
        out.append(prefix + k)
        if isinstance(v, mlc.ConfigDict):
            out += _keys(v, prefix + k + ".")
    return out


def override(cfg: mlc.ConfigDict, key: str, value) -> None:
    """Sets a dotted key ("train.lr") of an existing config entry; unknown keys and wrong types are UserErrors."""
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts):
        if not isinstance(node, mlc.ConfigDict) or part not in node:
            close = difflib.get_close_matches(key, _keys(cfg), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise errors.UserError(f"unknown config key '{key}'{hint}")
        if i < len(parts) - 1:
            node = node[part]
    old = node[parts[-1]]
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if old is not None and value is not None and type(old) is not type(value):
        if isinstance(old, tuple | list) and isinstance(value, tuple | list):
            value = type(old)(value)
        else:
            raise errors.UserError(
                f"config key '{key}' expects {type(old).__name__}, got {value!r} ({type(value).__name__})"
            )
    with node.unlocked():
        node[parts[-1]] = value


def apply_overrides(cfg: mlc.ConfigDict, args: list[str]) -> mlc.ConfigDict:
    """Applies ["--config.a.b=v", "--config.c", "w", ...] to cfg in place and returns it."""
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--config."):
            raise errors.UserError(f"unrecognised argument {arg!r} (overrides look like --config.train.lr=3e-4)")
        key, eq, value = arg[len("--config.") :].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise errors.UserError(f"override {arg} has no value")
            i += 1
            value = args[i]
        override(cfg, key, parse_value(value))
        i += 1
    return cfg


def model_cfg(cfg: mlc.ConfigDict) -> model_config.ModelConfig:
    return model_config.ModelConfig.from_dict(cfg.model.to_dict())


def validate(cfg: mlc.ConfigDict) -> None:
    """Checks the settings that would otherwise fail deep inside a run; raises UserError on the first problem."""
    for key in ("seed", "model", "data", "train", "eval", "mesh", "wandb"):
        if key not in cfg:
            raise errors.UserError(f"config has no '{key}' section; start from research.config.base_config()")
    m = model_cfg(cfg)
    d, t, e = cfg.data, cfg.train, cfg.eval

    def positive(name, value):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise errors.UserError(f"{name} must be a positive integer, got {value!r}")

    positive("data.batch_size", d.batch_size)
    positive("data.seq_len", d.seq_len)
    positive("train.steps", t.steps)
    positive("eval.batch_size", e.batch_size)
    for name in ("log_every", "eval_every", "ckpt_every", "keep_checkpoints"):
        positive(f"train.{name}", t[name])
    if d.seq_len > m.max_seq_len:
        raise errors.UserError(f"data.seq_len ({d.seq_len}) exceeds model.max_seq_len ({m.max_seq_len})")
    if t.lr <= 0 or t.min_lr < 0 or t.warmup_steps < 0:
        raise errors.UserError("train.lr must be > 0, train.min_lr >= 0 and train.warmup_steps >= 0")
    window = e.window or d.seq_len
    if window > m.max_seq_len:
        raise errors.UserError(f"eval.window ({window}) exceeds model.max_seq_len ({m.max_seq_len})")
    if e.stride is not None and not 0 < e.stride <= window:
        raise errors.UserError(f"eval.stride must be in [1, eval.window={window}], got {e.stride}")
    if cfg.wandb.mode not in ("offline", "online", "disabled"):
        raise errors.UserError(f"wandb.mode must be offline, online or disabled, got {cfg.wandb.mode!r}")


def to_json(cfg: mlc.ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)


def from_dict(d: dict) -> mlc.ConfigDict:
    return mlc.ConfigDict(d)
