"""Hugging Face checkpoints: load them into our NNX transformer exactly, and export any model back.

    pre = hf.load("path/to/gpt2")            # a directory with config.json + model.safetensors (or sharded)
    pre = hf.load("facebook/opt-125m")       # a hub id: downloaded through huggingface_hub (needs a network)
    logits = models.merge(pre.graphdef, pre.params)(tokens)
    hf.export(pre.cfg, pre.params, "out/dir", tokenizer=pre.tokenizer)   # transformers' from_pretrained loads it

Families (see `families`): gpt2, llama, mistral, qwen2, opt, gpt_neox. Weights are read straight from the
safetensors files (no torch); fp32, bf16 and fp16 checkpoints load into float32 master weights (what training and
compression update), or with `params="checkpoint"` as stored (`ziplm eval`: a bf16 model in half the memory,
evaluated a block at a time, the same numbers); the compute dtype is the `dtype`
argument. Every name, shape and dtype is checked against `config.json` before any weight is converted: a missing
or extra tensor, or a shape that disagrees, is a one-line error naming the tensor.

Known gaps, each refused with a clear error: RoPE scalings other than linear and llama3 (dynamic, yarn, longrope),
OPT-350m's post-LN and projection layers, Qwen2 per-layer sliding windows, PyTorch `.bin` checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from research import errors, hardware, models, tree
from research.data import tokenizers
from research.files import AtomicDir
from research.models.config import DTYPES, ModelConfig
from research.models.hf import families, files

PARAMS = ("float32", "checkpoint")  # the master weights' dtype (`load`)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", *tokenizers.TOKENIZER_FILE_NAMES]


@dataclasses.dataclass
class Pretrained:
    """A loaded checkpoint.

    Attributes:
      cfg: our model config.
      graphdef, params: the model as `models.split` returns it (params float32).
      model_type: the Hugging Face family.
      directory: where it was read from.
      tokenizer: a tokenizer spec: "hf:<dir>" when the directory holds tokenizer files, "byte" for a byte-level
        model exported by us (config.json says "ziplm_tokenizer": "byte"), else None.
    """

    cfg: ModelConfig
    graphdef: object
    params: dict
    model_type: str
    directory: Path
    tokenizer: str | None


def is_checkpoint_dir(path) -> bool:
    """Whether `path` is a directory holding a Hugging Face `config.json`."""
    return (Path(path) / "config.json").is_file()


def resolve(source: str) -> Path:
    """A local checkpoint directory for `source`: the directory itself, or a hub id downloaded to the HF cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not is_checkpoint_dir(path):
            raise errors.UserError(
                f"{path} is neither a run directory (no checkpoints/ inside) nor a Hugging Face checkpoint "
                "directory (no config.json)"
            )
        return path
    if path.exists():
        raise errors.UserError(f"{path} is a file; pass the checkpoint directory that holds config.json")
    if not _HUB_ID.match(source) or source.startswith("."):
        raise errors.UserError(f"checkpoint directory {source} does not exist")
    tokenizers.hub_or_error(source, "config.json", what="checkpoint")
    try:
        import huggingface_hub

        return Path(huggingface_hub.snapshot_download(source, allow_patterns=_HUB_FILES))
    except Exception as e:  # offline, unknown repo, gated repo: the hub raises many types
        raise errors.UserError(
            f"{source} is not a local directory and could not be fetched from the Hugging Face Hub "
            f"({type(e).__name__}); pass a local checkpoint directory"
        ) from None


def read_hf_config(directory: Path):
    """The transformers config object of a checkpoint directory, after checking its model_type."""
    try:
        raw = json.loads((directory / "config.json").read_text())
    except ValueError as e:
        raise errors.UserError(f"{directory / 'config.json'} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise errors.UserError(f"{directory / 'config.json'} holds a JSON {type(raw).__name__}, not an object")
    kind = raw.get("model_type")
    if kind not in families.SUPPORTED:
        raise errors.UserError(
            f"model_type {kind!r} in {directory / 'config.json'} is not supported; "
            f"supported: {', '.join(families.SUPPORTED)}"
        )
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(str(directory))
    except Exception as e:
        text = " ".join(str(e).split())[:240]
        raise errors.UserError(f"cannot read {directory / 'config.json'}: {type(e).__name__}: {text}") from None


def load(source: str, dtype: str = "float32", params: str = "float32") -> Pretrained:
    """Loads a Hugging Face checkpoint (directory or hub id) into our parameter tree.

    Args:
      source: a directory with config.json and safetensors weights, or a hub id.
      dtype: compute dtype of the model ("float32", "bfloat16", "float16").
      params: the master weights' dtype: "float32" (what training and compression update), or "checkpoint" (each
        tensor as stored: a bf16 checkpoint stays bf16, half the memory; evaluate it with
        `metrics.evaluate(..., blockwise=True)`, which converts one block at a time, exactly).

    Returns:
      A `Pretrained`.
    """
    directory = resolve(source)
    hf_cfg = read_hf_config(directory)
    tok = f"hf:{directory}" if tokenizers.has_files(directory) else None
    if tok is None and getattr(hf_cfg, "ziplm_tokenizer", None) == "byte":
        tok = "byte"
    return from_tensors(hf_cfg, files.Checkpoint(directory), directory, tok, dtype, params)


def from_tensors(
    hf_cfg, ckpt, where, tokenizer: str | None, dtype: str = "float32", params: str = "float32"
) -> Pretrained:
    """Converts Hugging Face-named tensors into our parameter tree, checking every name and shape first.

    Args:
      hf_cfg: a transformers config object (its model_type one of `families.SUPPORTED`).
      ckpt: the tensors: `.names()` (a set), `.shapes` ({name: shape}) and `.get(name)` (a NumPy array in the
        Hugging Face layout); `files.Checkpoint` for safetensors, `gguf.Tensors` for GGUF files.
      where: the checkpoint's location, for messages and `Pretrained.directory`.
      tokenizer: the tokenizer spec to record.
      dtype: compute dtype.
      params: "float32" master weights, or "checkpoint": each tensor in its stored float dtype (see `load`).

    Returns:
      A `Pretrained`.
    """
    directory = Path(where)
    try:
        cfg = families.model_config(hf_cfg, dtype)
    except (families.Unsupported, errors.UserError) as e:
        raise errors.UserError(f"{directory}: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError) as e:  # a string where a number belongs, ...
        raise errors.UserError(f"{directory}: its config does not describe a valid model ({e})") from None
    kind = hf_cfg.model_type
    names = _canonical_names(ckpt.names(), kind)
    rules = families.rules(cfg, kind)
    graphdef, abstract = models.abstract(cfg)
    shapes = {p: tuple(a.shape) for p, a in tree.flatten(abstract).items()}
    _check_names(rules, names, cfg, kind, directory)
    for rule in rules:  # every shape is checked before any weight is read
        stored = names[rule.hf]
        want = families.hf_shape(rule, [shapes[p] for p in rule.ours])
        got = ckpt.shapes[stored]
        if tuple(got) != tuple(want):
            raise errors.UserError(
                f"tensor {stored} has shape {tuple(got)} but the config implies {tuple(want)} ({directory})"
            )
    if params not in PARAMS:
        raise errors.UserError(f"params must be one of {PARAMS}, got {params!r}")
    flat = {}
    for rule in rules:
        array = np.asarray(ckpt.get(names[rule.hf]))
        array = array.astype(np.float32 if params == "float32" else array.dtype, copy=False)
        for path, part in zip(rule.ours, families.to_ours(rule, array, [shapes[p] for p in rule.ours])):
            flat[path] = jnp.asarray(part)  # one tensor at a time: peak memory stays near the model's size
    params = tree.map_with_path(lambda p, _: flat[p], abstract)
    hardware.release_freed_memory()  # the per-tensor NumPy temporaries' pages
    return Pretrained(cfg, graphdef, params, kind, directory, tokenizer)


def _canonical_names(stored: set[str], kind: str) -> dict[str, str]:
    """{canonical name: stored name}: adds the base-model prefix some checkpoints omit (GPT-2's "h.0...")
    and accepts "lm_head" for GPT-NeoX's "embed_out"."""
    prefix = families.PREFIX.get(kind, "")
    head = families.head_name(kind)
    bare = prefix and not any(n.startswith(prefix) for n in stored)
    out = {}
    for name in stored:
        canon = name
        if name in ("lm_head.weight", "embed_out.weight"):
            canon = head
        elif bare:
            canon = prefix + name
        out[canon] = name
    return out


def _check_names(rules, names: dict[str, str], cfg, kind: str, directory) -> None:
    expected = {r.hf for r in rules}
    missing = sorted(expected - set(names))
    extra = sorted(
        names[n]
        for n in set(names) - expected
        if not n.endswith(families.IGNORED) and not (cfg.tie_embeddings and n == families.head_name(kind))
    )
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise errors.UserError(f"{directory}: tensor(s) missing from the checkpoint: {missing[:3]}{more}")
    if extra:
        more = f" (and {len(extra) - 3} more)" if len(extra) > 3 else ""
        raise errors.UserError(f"{directory}: unexpected tensor(s) for this config.json: {extra[:3]}{more}")


def family(cfg: ModelConfig, model_type: str | None = None):
    """The Hugging Face family that writes `cfg` exactly: (model_type, its transformers config, the ModelConfig
    that config reads back as), or UserError naming what no config.json can say.

    Args:
      cfg: the model's config.
      model_type: the family asked for; default: the first that represents `cfg` exactly.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    if cfg.act_bits is not None:
        raise errors.UserError(
            f"this model fake-quantizes its linear inputs to {cfg.act_bits} bits (act_bits), which a Hugging Face "
            "config.json cannot express; export the model compressed without the act_quant entry instead"
        )
    try:
        model_type = model_type or families.default_model_type(cfg)
        hf_cfg = transformers.AutoConfig.for_model(model_type, **families.hf_config_dict(cfg, model_type))
        full = families.model_config(hf_cfg, cfg.dtype)
    except families.Unsupported as e:
        raise errors.UserError(str(e)) from None
    diff = families.same_function(cfg, full)
    if diff:
        raise errors.UserError(f"a {model_type} config.json cannot express this model exactly (differs in {diff})")
    return model_type, hf_cfg, full


def export(
    cfg: ModelConfig,
    params,
    out: str | Path,
    *,
    model_type: str | None = None,
    tokenizer: str | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    max_shard_bytes: int | None = None,
    packed: dict | None = None,
    quantization_config: dict | None = None,
) -> dict:
    """Writes a model as a Hugging Face checkpoint directory that `transformers` loads with from_pretrained.

    Args:
      cfg, params: the model (dense weights; a compressed model passes its effective weights).
      out: target directory; an existing non-empty one is refused unless `overwrite`.
      model_type: the family to write; default: the first that represents `cfg` exactly.
      tokenizer: a tokenizer spec; the files of an "hf:<dir>" tokenizer are copied alongside, and "byte" is
        recorded in config.json as "ziplm_tokenizer".
      dtype: stored dtype ("float32", "bfloat16", "float16").
      overwrite: replace an existing directory (only once the new one is complete).
      max_shard_bytes: split the weights into shards plus an index past this size.
      packed: {HF weight name: {tensor name: array}} written in place of those weights' floats (a quantized
        format's tensors, `research.export.compressed_tensors`).
      quantization_config: the config.json's "quantization_config" that says how to read `packed`.

    Returns:
      {"directory", "model_type", "files", "tokenizer_files"}.
    """
    if dtype not in DTYPES:
        raise errors.UserError(f"export dtype must be one of {DTYPES}, got {dtype!r}")
    model_type, hf_cfg, full = family(cfg, model_type)
    hf_cfg.architectures = [families.architecture(model_type)]
    hf_cfg.dtype = dtype
    if tokenizer == "byte":  # no tokenizer files exist for raw bytes; record it so that loading finds it again
        hf_cfg.ziplm_tokenizer = "byte"
    if quantization_config is not None:
        hf_cfg.quantization_config = quantization_config
    packed = packed or {}
    flat = {p: np.asarray(a, np.float32) for p, a in tree.flatten(params).items()}
    _, abstract = models.abstract(full)
    shapes = {p: tuple(a.shape) for p, a in tree.flatten(abstract).items()}
    tensors, used = {}, set()
    for rule in families.rules(full, model_type):
        arrays = []
        for path in rule.ours:
            if path not in flat and not path.endswith("bias"):
                raise errors.UserError(f"parameter {path} is missing from the model being exported")
            arrays.append(flat.get(path, np.zeros(shapes[path], np.float32)))
            used.add(path)
        if rule.hf in packed:
            tensors.update(packed[rule.hf])
            continue
        tensors[rule.hf] = np.ascontiguousarray(families.to_hf(rule, arrays).astype(jnp.dtype(dtype)))
    unused = sorted(p for p in set(flat) - used if np.any(flat[p]))
    if unused:
        raise errors.UserError(f"a {model_type} checkpoint has no place for parameter(s) {unused[:3]}")
    tok_dir = _tokenizer_dir(tokenizer)
    with AtomicDir(Path(out), overwrite) as tmp:
        hf_cfg.save_pretrained(str(tmp))
        written = files.write(tmp, tensors, max_shard_bytes)
        copied = []
        for name in tokenizers.TOKENIZER_FILE_NAMES if tok_dir else ():
            if (tok_dir / name).is_file():
                shutil.copy2(tok_dir / name, tmp / name)
                copied.append(name)
    return {"directory": str(out), "model_type": model_type, "files": written, "tokenizer_files": copied}


def _tokenizer_dir(spec: str | None) -> Path | None:
    if not spec or spec == "byte":
        return None
    if spec.startswith("gguf:"):  # the tokenizer ziplm builds from a GGUF file's metadata (cached as a directory)
        return tokenizers.gguf_directory(spec.removeprefix("gguf:"))
    path = Path(spec.removeprefix("hf:")).expanduser()
    return path if path.is_dir() and tokenizers.has_files(path) else None
