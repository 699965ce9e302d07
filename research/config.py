"""Run configuration: Python files with `get_config()`, command-line overrides, and checks.

A config is an `ml_collections.ConfigDict` holding every setting of a run, the seed included. `base_config()` is
the demo's setting and the starting point of the files in `experiments/configs/`. On the command line,

    ziplm train --config experiments/configs/shakespeare_char_cpu.py --config.train.lr=3e-4

loads the file, calls its `get_config()` (or `get_config(arg)` for `file.py:arg`), and applies the overrides. An
override of an unknown key, or of a value with the wrong type, is a one-line error.

Why not `ml_collections.config_flags`: it defines absl flags on absl's global flag registry and parses
`sys.argv` through `absl.app`, while ziplm's command line is argparse with sub-commands (`ziplm compress
--config ... --config.KEY=V`), several configs per process (the demo, sweeps, tests) and one-line errors with
"did you mean" suggestions; its override parser is not public API. The lines here (`override`) parse each
value by the type of the entry it replaces (`ast.literal_eval` / JSON for lists, so a whole compress list is one
override) and also reach into the plain lists and dicts of a config (`--config.compress.0.sparsity=0.6`).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import inspect
import json
import math
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
    # ("replicated", "fsdp" or "tensor"; see research/parallel/sharding.py).
    c.mesh = dict(data=-1, model=1, rules="fsdp")
    # W&B: "offline" (default; writes under the run directory, no network), "online", or "disabled".
    # The environment variable WANDB_MODE, when set, takes precedence.
    c.wandb = dict(mode="offline", project="ziplm", entity=None, name=None, group=None, job_type=None, sweep=None)
    # Compression transforms to train under, as in a compress config's list (methods without calibration: QAT
    # from the start, gradual pruning during pre-training); [] trains the dense model.
    c.compress = []
    # Many processes (see research/parallel/distributed.py): enabled=True with all three of coordinator,
    # num_processes, process_id, or with none of them where JAX detects them (Cloud TPU, SLURM).
    c.distributed = dict(enabled=False, coordinator=None, num_processes=None, process_id=None)
    return c


def flat(d: dict, prefix: str = "") -> dict:
    """A nested dict as {"a.b.c": value} (lists kept as values): how configs are compared on resume."""
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def load(path: str) -> mlc.ConfigDict:
    """Loads `path` or `path:arg` and returns its get_config() (or get_config(arg))."""
    file, _, arg = path.partition(":")
    p = Path(file)
    if not p.is_file():
        raise errors.UserError(f"config file {p} does not exist")
    if p.suffix != ".py":
        raise errors.UserError(f"config file {p} is not a Python file (configs are .py files with get_config())")
    spec = importlib.util.spec_from_file_location(f"_ziplm_config_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise errors.UserError(f"config file {p} has a syntax error at line {e.lineno}: {e.msg}") from None
    except errors.UserError:
        raise
    except Exception as e:
        raise errors.UserError(f"config file {p} failed to load: {type(e).__name__}: {_line(e)}") from None
    if not callable(getattr(module, "get_config", None)):
        raise errors.UserError(f"config file {p} defines no get_config()")
    n_params = len(inspect.signature(module.get_config).parameters)
    if arg and n_params == 0:
        raise errors.UserError(f"get_config() in {p} takes no argument, but '{path}' passes {arg!r}")
    try:
        cfg = module.get_config(arg) if arg else module.get_config()
    except errors.UserError:
        raise
    except Exception as e:
        raise errors.UserError(f"get_config() in {p} raised {type(e).__name__}: {_line(e)}") from None
    if isinstance(cfg, dict):
        cfg = mlc.ConfigDict(cfg)
    if not isinstance(cfg, mlc.ConfigDict):
        raise errors.UserError(f"get_config() in {p} returned a {type(cfg).__name__}, not a ConfigDict or dict")
    return cfg


def _line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return text[:200] or "(no message)"


# Entries whose default is None, and the type a value must have when one is set.
NULLABLE = {
    "model.n_kv_head": int,
    "model.d_ff": int,
    "model.head_dim": int,
    "model.rotary_dim": int,
    "model.sliding_window": int,
    "model.qkv_bias": bool,
    "model.o_bias": bool,
    "model.mlp_bias": bool,
    "model.norm_bias": bool,
    "eval.window": int,
    "eval.stride": int,
    "eval.max_windows": int,
    "wandb.entity": str,
    "wandb.name": str,
    "wandb.group": str,
    "wandb.job_type": str,
    "wandb.sweep": str,
    "distributed.coordinator": str,
    "distributed.num_processes": int,
    "distributed.process_id": int,
}
# Entries that take more than one type: a preset name or an explicit list of rules.
UNIONS = {"mesh.rules": (str, list, tuple)}


def parse_value(text: str):
    """A command-line value as a Python literal, else as JSON (true / false / null), else the string itself.

    A value that looks like a list or dict ("[" or "{" first) but parses as neither is a UserError naming where
    the parse failed, rather than a string that a later type check would refuse without the reason."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        python_error = e
    try:
        return json.loads(text)
    except ValueError as e:
        json_error = e
    if text.lstrip().startswith(("[", "{")):
        where = getattr(python_error, "offset", None)
        at = f" at character {where}" if where else ""
        raise errors.UserError(
            f"cannot parse {text!r} as a Python literal ({type(python_error).__name__}{at}) or as JSON "
            f"({json_error}); write it as a Python literal, e.g. [{{'method': 'rtn', 'symmetric': False}}]"
        )
    return text


def _keys(cfg: mlc.ConfigDict, prefix: str = "") -> list[str]:
    out = []
    for k, v in cfg.items():
        out.append(prefix + k)
        if isinstance(v, mlc.ConfigDict):
            out += _keys(v, prefix + k + ".")
    return out


def _coerce(key: str, old, value):
    """`value` (a Python object, or the text of a command-line value) as the type entry `key` holds."""
    text = value if isinstance(value, str) else None
    if value is None or (text is not None and text.lower() in ("none", "null")):
        if old is None or key in NULLABLE:
            return None
        raise errors.UserError(f"config key '{key}' cannot be None (it holds a {type(old).__name__})")
    wanted = UNIONS.get(key) or ((NULLABLE.get(key),) if old is None else (type(old),))
    if wanted == (None,):  # a user-added entry without a declared type
        return parse_value(text) if text is not None else value
    if text is not None:
        if str in wanted:
            value = text if not (text.startswith(("[", "(")) and list in wanted) else parse_value(text)
        elif bool in wanted and text.lower() in ("true", "false"):
            value = text.lower() == "true"
        else:
            value = parse_value(text)
    if float in wanted and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, list | tuple) and (list in wanted or tuple in wanted) and type(value) not in wanted:
        value = wanted[0](value)
    if type(value) not in wanted:
        names = " or ".join(t.__name__ for t in wanted)
        raise errors.UserError(f"config key '{key}' expects {names}, got {value!r} ({type(value).__name__})")
    return value


def override(cfg: mlc.ConfigDict, key: str, value) -> None:
    """Sets a dotted key ("train.lr") of an existing config entry; unknown keys and wrong types are UserErrors.

    Args:
      cfg: the config, changed in place.
      key: dotted path of an existing entry.
      value: a Python value, or command-line text that is parsed according to the entry's type (text for
        string entries, true/false for booleans, Python literals otherwise; "None" where None is allowed).
    """
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            part = parts[i] = int(part)
        elif isinstance(node, dict) and last:  # a plain dict (e.g. a compress method's arguments) takes new keys
            break
        elif not isinstance(node, mlc.ConfigDict | dict) or part not in node:
            close = difflib.get_close_matches(key, _keys(cfg), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise errors.UserError(f"unknown config key '{key}'{hint}")
        if not last:
            node = node[part]
    if isinstance(node, mlc.ConfigDict):
        value = _coerce(key, node[parts[-1]], value)
        with node.unlocked(), node.ignore_type():
            node[parts[-1]] = value
    else:  # an entry of a plain list or dict: typed like its old value when it has one
        old = node[parts[-1]] if (isinstance(node, list) or parts[-1] in node) else None
        node[parts[-1]] = _coerce(key, old, value)


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
        override(cfg, key, value)
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

    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool) or not 0 <= cfg.seed < 2**31:
        raise errors.UserError(f"seed must be an integer in 0 .. 2**31 - 1, got {cfg.seed!r}")
    vf = d.get("val_fraction")
    if not isinstance(vf, int | float) or isinstance(vf, bool) or not 0 < vf < 1:
        raise errors.UserError(f"data.val_fraction must be in (0, 1) (evaluation needs validation text), got {vf!r}")
    for name in ("corpus", "tokenizer", "sampling"):
        if not isinstance(d[name], str) or not d[name]:
            raise errors.UserError(f"data.{name} must be a non-empty string, got {d[name]!r}")
    if not isinstance(cfg.mesh.rules, str | list | tuple):
        raise errors.UserError(f"mesh.rules must be a preset name or a list of (regex, spec), got {cfg.mesh.rules!r}")
    for name in ("window", "stride", "max_windows"):
        if e[name] is not None:
            positive(f"eval.{name}", e[name])
    positive("data.batch_size", d.batch_size)
    positive("data.seq_len", d.seq_len)
    positive("train.steps", t.steps)
    positive("eval.batch_size", e.batch_size)
    for name in ("log_every", "eval_every", "ckpt_every", "keep_checkpoints"):
        positive(f"train.{name}", t[name])
    if d.seq_len > m.max_seq_len:
        raise errors.UserError(f"data.seq_len ({d.seq_len}) exceeds model.max_seq_len ({m.max_seq_len})")
    for name in ("lr", "min_lr", "weight_decay", "b1", "b2", "grad_clip"):
        v = t.get(name)
        if v is not None and (not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v)):
            raise errors.UserError(f"train.{name} must be a finite number, got {v!r}")
    if t.lr <= 0 or t.min_lr < 0 or t.warmup_steps < 0:
        raise errors.UserError("train.lr must be > 0, train.min_lr >= 0 and train.warmup_steps >= 0")
    if t.min_lr > t.lr:
        raise errors.UserError(f"train.min_lr ({t.min_lr}) must not exceed train.lr ({t.lr})")
    for name in ("b1", "b2"):
        if name in t and not 0 <= t[name] < 1:
            raise errors.UserError(f"train.{name} must be in [0, 1), got {t[name]}")
    for name in ("weight_decay", "grad_clip"):
        if t.get(name) is not None and t[name] < 0:
            raise errors.UserError(f"train.{name} must be >= 0, got {t[name]}")
    window = e.window or d.seq_len
    if window > m.max_seq_len:
        raise errors.UserError(f"eval.window ({window}) exceeds model.max_seq_len ({m.max_seq_len})")
    if e.stride is not None and e.stride > window:
        raise errors.UserError(f"eval.stride must be in [1, eval.window={window}], got {e.stride}")
    if cfg.wandb.mode not in ("offline", "online", "disabled"):
        raise errors.UserError(f"wandb.mode must be offline, online or disabled, got {cfg.wandb.mode!r}")


def to_json(cfg: mlc.ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)


def from_dict(d: dict) -> mlc.ConfigDict:
    return mlc.ConfigDict(d)
