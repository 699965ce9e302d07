"""Models as packed files: `ziplm pack`, `unpack`, `inspect`, and loading a packed file as a model.

    report = packed.pack_model("runs/pruned", "pruned.zlm")      # any model source; a compressed directory's
                                                                 # saved transform state guides the coding
    m = sources.load("pruned.zlm")                               # evaluates like the directory it came from
    packed.unpack_model("pruned.zlm", "runs/unpacked")           # a directory `ziplm eval --model` loads

The header's meta holds the model config, the tokenizer spec, the source and (for runs of ours) the run config,
so a packed model evaluates on its own corpus split like the run it came from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from research import errors, files
from research.coding import container, pack


def is_packed(path) -> bool:
    p = Path(path).expanduser()
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(len(container.MAGIC)) == container.MAGIC


def _state_hints(source) -> dict:
    """Hints from the transform state of a `ziplm compress` directory (none for other sources)."""
    from research.compress import pipeline

    path = Path(source).expanduser().resolve()
    if not pipeline.is_compressed(path) or not (path / "state").is_dir():
        return {}
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        return pack.hints(ckptr.restore(path / "state"))


def pack_model(source: str, out, *, step: int | None = None, overwrite: bool = False, progress=None) -> dict:
    """Packs the model `source` names (run, compressed directory, HF directory, hub id) into `out`; returns the
    report of `pack.report` with the source added."""
    from research import sources

    m = sources.load(source, step)
    rep = pack.pack(
        m.params,
        out,
        meta=meta(m.cfg, m.tokenizer, source, m.kind, m.step, m.run_config),
        hints=_state_hints(source),
        overwrite=overwrite,
        progress=progress,
    )
    return dict(rep, source=str(source))


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


def load(path):
    """(meta, model config, graphdef, params as jax arrays) of a packed file, every checksum checked."""
    import jax
    import jax.numpy as jnp

    from research import models, tree
    from research.models import config as model_config

    meta, params = pack.unpack(path)
    cfg = model_config.ModelConfig.from_dict(meta["model"])
    graphdef, abstract = models.abstract(cfg)
    want = {p: tuple(a.shape) for p, a in tree.flatten(abstract).items()}
    got = {p: tuple(a.shape) for p, a in tree.flatten(params).items()}
    if want != got:
        diff = sorted(set(want) ^ set(got)) or [p for p in want if want[p] != got[p]]
        raise errors.CorruptData(f"{path}: the packed tensors do not match its model config (first: {diff[0]})")
    return meta, cfg, graphdef, jax.tree.map(lambda a, b: jnp.asarray(b, a.dtype), abstract, params)


def unpack_model(path, out, *, overwrite: bool = False) -> Path:
    """Writes a packed model as a directory `sources.load` reads (compressed.json + params/), atomically."""
    import orbax.checkpoint as ocp

    from research.compress import pipeline

    meta, cfg, _, params = load(path)
    target = Path(out).expanduser().resolve()
    with files.AtomicDir(target, overwrite) as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "params", params)
            ckptr.wait_until_finished()
        record = dict(
            format=pipeline.FORMAT,
            version=pipeline.VERSION,
            model=cfg.to_dict(),
            tokenizer=meta.get("tokenizer"),
            corpus=None,
            source=str(Path(path).expanduser().resolve()),
            source_step=meta.get("source_step"),
            run_config=meta.get("run_config"),
            unpacked_from=str(path),
        )
        files.write_json(tmp / "compressed.json", record)
    return target


def inspect(path, *, verify: bool = True) -> dict:
    """The contents of a packed file from its header (nothing is decoded): the report plus one row per leaf.
    With `verify`, the whole-file SHA-256 is checked too (reading the file, not decoding it)."""
    r = container.Reader(path)
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
