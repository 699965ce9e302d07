"""One entry point for "a model": a run directory of ours, a Hugging Face checkpoint directory, or a hub id.

m = sources.load("runs/demo")              # our orbax checkpoint (latest step, or step=N)
m = sources.load("path/to/opt-125m")       # config.json + safetensors
m = sources.load("EleutherAI/pythia-70m")  # downloaded when a network is available
m = sources.load("runs/pruned")            # the model.zlm that `ziplm compress` wrote there
m = sources.load("pruned.zlm")             # a packed model written by `ziplm compress` or `ziplm pack`
m = sources.load("model.gguf")             # a GGUF file (llama.cpp's format; models.gguf)
m = sources.load("smollm2-135m")           # a model of the zoo, once `ziplm pull smollm2-135m` fetched it
logits = models.merge(m.graphdef, m.params)(tokens)
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from research import errors
from research.coding import artifact
from research.models import config as model_config


@dataclasses.dataclass
class Model:
    """A loaded model and where it came from.

    Attributes:
      cfg: the model config; graphdef, params: as `models.split` returns them.
      tokenizer: a tokenizer spec, or None when the source has none.
      kind: "run", "hf", "gguf" or "packed" ("compressed": a directory of the format before model.zlm).
      source: what was asked for; step: the checkpoint step of a run (None for HF).
      run_config: the run's ConfigDict (None for HF), with its corpus, eval settings and seed.
      model_type: the Hugging Face family (for HF sources), used again on export.
    """

    cfg: model_config.ModelConfig
    graphdef: object
    params: dict
    tokenizer: str | None
    kind: str
    source: str
    step: int | None = None
    run_config: object = None
    model_type: str | None = None


def is_run(path) -> bool:
    return (Path(path).expanduser() / "checkpoints").is_dir()


def packed_file(path) -> Path | None:
    """The packed model that `path` names: the file itself, or a `ziplm compress` directory's model.zlm."""
    p = Path(path).expanduser()
    if p.is_dir() and not is_run(p):
        p = p / "model.zlm"
    return p if artifact.is_packed(p) else None


def load(source: str, step: int | None = None, dtype: str | None = None, params: str = "float32") -> Model:
    """Loads the model `source` names (see the module docstring).

    Args:
      source: a run directory, a compressed directory, a packed file, a GGUF file, a pulled zoo name, a Hugging
        Face checkpoint directory, or a hub id.
      step: checkpoint step of a run (default: the latest); not allowed for HF sources.
      dtype: compute dtype for HF and GGUF checkpoints (default float32); runs keep their configured dtype.
      params: master weights of an HF checkpoint: "float32", or "checkpoint" (as stored, host arrays: bf16 stays
        bf16; see `hf.load`). Runs, packed files and GGUF files load as they always do.
    """
    from research.models import gguf, zoo

    source = zoo.resolve(source)
    if gguf.is_gguf(source):
        if step is not None:
            raise errors.UserError(f"--step applies to run directories; {source} is a GGUF file")
        pre = gguf.load(source, dtype or "float32")
        return Model(pre.cfg, pre.graphdef, pre.params, pre.tokenizer, "gguf", source, model_type=pre.model_type)
    file = packed_file(source)
    if file is not None:
        if step is not None:
            raise errors.UserError(f"--step applies to run directories; {source} is a packed model")
        from research import config as run_config

        meta, cfg, graphdef, params = artifact.load(file)
        run_cfg = run_config.from_dict(meta["run_config"]) if meta.get("run_config") else None
        return Model(cfg, graphdef, params, meta.get("tokenizer"), "packed", source, None, run_cfg)
    if (Path(source).expanduser() / "compressed.json").is_file():
        if step is not None:
            raise errors.UserError(f"--step applies to run directories; {source} is a compressed model")
        return _load_old_compressed(source)
    if is_run(source):
        from research import config as run_config
        from research.train import checkpoint

        cfg, graphdef, params, meta = checkpoint.load_run(source, step)
        return Model(run_config.model_cfg(cfg), graphdef, params, meta["tokenizer"], "run", source, meta["step"], cfg)
    if step is not None:
        raise errors.UserError(f"--step applies to run directories; {source} is not one (no checkpoints/ inside)")
    from research.models import hf

    pre = hf.load(source, dtype or "float32", params)
    return Model(pre.cfg, pre.graphdef, pre.params, pre.tokenizer, "hf", source, model_type=pre.model_type)


def _load_old_compressed(source) -> Model:
    """A directory of the compressed format before model.zlm (compressed.json + orbax params/), read for one
    more release with a deprecation message."""
    import json

    import orbax.checkpoint as ocp

    from research import config as run_config
    from research import models

    path = Path(source).expanduser().resolve()
    print(
        f"warning: {source} is a compressed directory of the old format (compressed.json + params/), read for one "
        f"more release; convert it: ziplm pack --model {source} --out {source}/model.zlm",
        file=sys.stderr,
    )
    try:
        record = json.loads((path / "compressed.json").read_text())
        cfg = model_config.ModelConfig.from_dict(record["model"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise errors.CorruptData(f"{path / 'compressed.json'} cannot be read ({type(e).__name__}: {e})") from None
    if record.get("format") != "ziplm-compressed" or record.get("version") != 1:
        raise errors.UserError(f"{path} is not a ziplm compressed model of version 1")
    graphdef, abstract = models.abstract(cfg)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(path / "params", abstract)
    run_cfg = run_config.from_dict(record["run_config"]) if record.get("run_config") else None
    return Model(cfg, graphdef, params, record.get("tokenizer"), "compressed", source, None, run_cfg)
