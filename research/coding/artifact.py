"""Models as packed files: `ziplm pack`, `inspect`, loading a packed file as a model, and the one measure of a
packed model's bytes (`sizes`) that every table reports.

    report = artifact.pack_model(sources.load("runs/demo"), "dense.zlm")  # any loaded model, every leaf searched
    m = sources.load("dense.zlm")                                       # evaluates like the run it came from
    artifact.sizes(report)                                                # bytes, bits per weight, ratios

`ziplm compress` writes its model.zlm with the codes its transforms export (`compress.pipeline`). The header's
meta holds the model config, the tokenizer spec, the source and (for runs of ours) the run config, so a packed
model evaluates on its own corpus split like the run it came from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from research import errors
from research.coding import container, pack


def is_packed(path) -> bool:
    p = Path(path).expanduser()
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(len(container.MAGIC)) == container.MAGIC


def pack_model(m, out, *, exported: dict | None = None, overwrite: bool = False, progress=None) -> dict:
    """Packs a loaded model (`sources.Model`) into `out`; returns the report of `pack.report` with the source.

    Args:
      m: the model (its params, config, tokenizer and provenance).
      out: the file to write (atomically; an existing one needs `overwrite`).
      exported: {path: code} a transform exported for these params (`core.export`); None: every leaf searched.
    """
    rep = pack.pack(
        m.params,
        out,
        meta=meta(m.cfg, m.tokenizer, m.source, m.kind, m.step, m.run_config),
        exported=exported,
        overwrite=overwrite,
        progress=progress,
    )
    return dict(rep, source=str(m.source))


SIZE_KEYS = ("file_bytes", "bits_per_weight", "bound_bits_per_weight", "ratio_vs_fp32", "ratio_vs_bf16", "kinds")


def sizes(rep: dict) -> dict:
    """The size of a packed model as every table reports it (from a `pack.report`): the file's bytes with every
    header, table and checksum counted, bits per weight, the entropy bound, ratios against float32 and bfloat16,
    and bytes per leaf kind."""
    return {k: rep[k] for k in SIZE_KEYS}


def meta(cfg, tokenizer, source, kind: str, step, run_config, **extra) -> dict:
    """The header metadata of a packed model: what `load` needs to rebuild and evaluate it, and where it came
    from (the run config gives eval its corpus split)."""
    return dict(
        model=cfg.to_dict(),
        tokenizer=tokenizer,
        source=str(source),
        source_kind=kind,
        source_step=step,
        run_config=run_config.to_dict() if run_config is not None else None,
        **extra,
    )


def check_model(reader: container.Reader):
    """The model a packed file's header describes, checked before anything is decoded: meta.model a valid model
    config, the tokenizer a spec or None, the run config a dict or None, and the leaves exactly the config's
    parameters with their shapes. Returns (cfg, graphdef, abstract params); CorruptData otherwise."""
    from research import models, tree
    from research.models import config as model_config

    meta, where = reader.meta, reader.path
    if not isinstance(meta.get("model"), dict):
        raise errors.CorruptData(f"{where}: the header has no model config (meta.model); not a packed model")
    try:
        cfg = model_config.ModelConfig.from_dict(meta["model"])
        graphdef, abstract = models.abstract(cfg)
    except Exception as e:  # unknown keys, wrong types, impossible sizes: the config cannot build a model
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise errors.CorruptData(
            f"{where}: the header's model config is invalid ({type(e).__name__}: {first})"
        ) from None
    for key in ("tokenizer", "source"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise errors.CorruptData(f"{where}: the header's {key} is {meta[key]!r}, not a string")
    if meta.get("run_config") is not None and not isinstance(meta["run_config"], dict):
        raise errors.CorruptData(f"{where}: the header's run config is not a record")
    want = {p: list(a.shape) for p, a in tree.flatten(abstract).items()}
    got = {leaf["path"]: list(leaf["shape"]) for leaf in reader.leaves}
    if want != got:
        diff = sorted(set(want) ^ set(got)) or [p for p in want if want[p] != got[p]]
        raise errors.CorruptData(
            f"{where}: the packed tensors do not match its model config (first: {diff[0]}: "
            f"{got.get(diff[0])} in the file, {want.get(diff[0])} in the config)"
        )
    return cfg, graphdef, abstract


def load(path):
    """(meta, model config, graphdef, params as jax arrays) of a packed file, every checksum checked."""
    import jax
    import jax.numpy as jnp

    cfg, graphdef, abstract = check_model(pack.open_file(path))
    meta, params = pack.unpack(path)
    return meta, cfg, graphdef, jax.tree.map(lambda a, b: jnp.asarray(b, a.dtype), abstract, params)


def inspect(path, *, verify: bool = True) -> dict:
    """The contents of a packed file from its header (nothing is decoded): the report plus one row per leaf.
    With `verify`, the whole-file SHA-256 is checked too (reading the file, not decoding it)."""
    r = pack.open_file(path)
    check_model(r)
    if verify:
        r.verify()
    rows = []
    for leaf in r.leaves:
        n = int(np.prod(leaf["shape"], dtype=np.int64))
        size = sum(s["length"] for s in leaf["sections"].values())
        bound = sum((s["bound_bits"] or 0.0) for s in leaf["sections"].values())
        rows.append(
            dict(
                path=leaf["path"],
                shape=leaf["shape"],
                dtype=leaf["dtype"],
                kind=leaf["kind"] + ("+mask" if leaf.get("masked") else ""),
                bytes=size,
                bits_per_weight=8 * size / max(n, 1),
                bound_bits_per_weight=bound / max(n, 1),
            )
        )
    return dict(pack.report(r), version=r.header["version"], meta=r.meta, leaves=rows, verified=verify)


def table(rep: dict, leaves: bool = False) -> str:
    """The packing report as text: per kind, per section, totals with the bound and the ratios."""
    from research import report

    lines = []
    if leaves and rep.get("leaves"):
        rows = [
            [
                x["path"],
                "x".join(map(str, x["shape"])),
                x["kind"],
                x["bytes"],
                x["bits_per_weight"],
                x["bound_bits_per_weight"],
            ]
            for x in rep["leaves"]
        ]
        lines.append(report.table(["leaf", "shape", "kind", "bytes", "bits/weight", "bound"], rows))
    kinds = [
        [k, v["leaves"], v["values"], v["bytes"], 8 * v["bytes"] / max(v["values"], 1)] for k, v in rep["kinds"].items()
    ]
    lines.append(report.table(["kind", "leaves", "values", "bytes", "bits/value"], kinds))
    secs = [
        [
            k,
            v["bytes"],
            v["bound_bits"] / 8,
            v["bytes"] / (v["bound_bits"] / 8) if v["bound_bits"] > 8 else None,
            v["huffman_bits"] / 8,
        ]
        for k, v in rep["sections"].items()
    ]
    lines.append(report.table(["section", "bytes", "bound bytes", "bytes / bound", "huffman bytes"], secs))
    lines.append(
        f"{rep['params']:,} parameters in {rep['file_bytes']:,} bytes ({rep['overhead_bytes']:,} of header and "
        f"checksums): {rep['bits_per_weight']:.3f} bits per weight (entropy bound "
        f"{rep['bound_bits_per_weight']:.3f}); compression ratio {rep['ratio_vs_fp32']:.2f}x vs float32, "
        f"{rep['ratio_vs_bf16']:.2f}x vs bfloat16"
    )
    return "\n".join(lines)
