"""The `compress` job: load a model, compress it with a chain of transforms, optionally fine-tune with the
compression held, evaluate before and after, and save the compressed model with a JSON summary.

    ziplm compress --config experiments/configs/prune.py:wanda [--workdir runs/x] [--config.compress.0.sparsity=0.6]

A compress config (see `base_config`) holds the source model, the data, the calibration sample, the chain of
methods (`compress`: a list of {"method": name, **arguments}, applied in order), the fine-tuning and the evaluation.
Two entries are not parameter transforms: {"finetune": steps} fine-tunes the chain so far, and
{"method": "act_quant", "bits": 8} fake-quantizes the inputs of the block linear layers per token
(`models.act_quant`; W8A8 with an 8-bit weight method): it sets the saved model config's `act_bits`, and every
evaluation, fine-tuning stage and calibration pass after it runs with quantized activations.
The output directory, written only when everything succeeded, holds:

    model.zlm         the compressed model, packed (`coding.pack`): every leaf a transform changed stored as the
                      typed record it exported (`core.export`: masks, grid codes with scales and zero points,
                      palette indices with their tables), the rest as entropy-coded bit-exact floats; its header
                      holds the model config, tokenizer, source, the source's run config and this compress config.
                      `ziplm eval / encode / export / pack --model DIR` read it (DIR or DIR/model.zlm). With
                      `shrink`, the smaller dense model of structured pruning.
    summary.json      methods, sparsity report, metrics before / after compression / after fine-tuning, seconds
                      per stage, and the packed sizes (`artifact.sizes`: bytes, bits per weight, ratios against
                      float32 and bfloat16) of the compressed model before fine-tuning ("packed_compressed") and of
                      the saved one ("packed")
    metrics.jsonl     fine-tuning losses (and W&B offline files under wandb/ when enabled)
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import jax
import ml_collections as mlc
import numpy as np

from research import codes as codes_lib
from research import config as config_lib
from research import errors, files, log, models, sources, tree
from research.coding import artifact
from research.coding import pack as coding_pack
from research.compress import calib as calib_lib
from research.compress import core, finetune, registry
from research.compress import report as compress_report
from research.data import corpora, dataset, tokenizers
from research.eval import metrics
from research.models import act_quant


def base_config() -> mlc.ConfigDict:
    """The defaults of a compress config: magnitude pruning to 50%, no fine-tuning."""
    c = mlc.ConfigDict()
    c.seed = 0
    c.model = ""  # a run directory, a Hugging Face checkpoint directory or a hub id
    c.step = None  # checkpoint step of a run (None: the latest)
    # corpus / tokenizer None: the source run's (HF sources need a corpus).
    c.data = dict(corpus=None, tokenizer=None, val_fraction=0.1, batch_size=16, seq_len=None)
    # Calibration windows (n=0: none) at seeded random offsets of `corpus` (a text of its own, tokenized whole) or,
    # when None, of the training split of data.corpus; length is capped by the model's context.
    c.calibration = dict(n=128, length=2048, seed=0, batch_size=8, corpus=None)
    # Methods applied in order; a {"finetune": steps} entry fine-tunes the chain so far (with the settings of
    # `finetune`) before the methods after it are initialised: prune -> fine-tune -> quantize is one list.
    c.compress = [dict(method="magnitude", sparsity=0.5)]
    # After structured pruning: save the physically smaller dense model (prune.structured.shrink) instead of masks.
    c.shrink = False
    c.finetune = dict(
        steps=0,
        lr=1e-4,
        min_lr=1e-5,
        warmup_steps=0,
        weight_decay=0.0,
        b1=0.9,
        b2=0.99,
        grad_clip=1.0,
        log_every=10,
    )
    # Evaluation: the validation split of data.corpus, or `corpus` (a text of its own, evaluated whole: e.g.
    # "wikitext:<wiki.test.raw>"); protocol "windows" (window/stride) or "gptq" (disjoint windows, the published
    # tables' protocol, with the tokenizer's default prefix first); window None: data.seq_len. `agreement` also
    # reports KL(dense || compressed) per token and top-1 agreement with the dense model; `dense` False skips the
    # dense model's own evaluation (summary "dense": None; for sweeps that evaluate it once).
    c.eval = dict(
        window=None,
        stride=None,
        batch_size=32,
        max_windows=None,
        corpus=None,
        protocol="windows",
        agreement=False,
        dense=True,
    )
    c.wandb = dict(mode="offline", project="ziplm", entity=None, name=None)
    return c


class ActQuant(NamedTuple):
    """A {"method": "act_quant", "bits": b} entry: per-token activation fake quantization from here on."""

    bits: int


def members(specs) -> list:
    """The `compress` list as Transforms, with the steps (ints) of its {"finetune": steps} entries and the
    `ActQuant` of its act_quant entry in place."""
    if not isinstance(specs, list | tuple) or not specs:
        raise errors.UserError("compress must be a non-empty list of {'method': name, ...} entries")
    out = []
    for spec in specs:
        spec = dict(spec)
        if set(spec) == {"finetune"}:
            steps = spec["finetune"]
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise errors.UserError(f"a {{'finetune': steps}} entry needs a positive integer, got {steps!r}")
            out.append(steps)
            continue
        if "method" not in spec:
            raise errors.UserError(f"compress entry {spec} has no 'method' (or is not {{'finetune': steps}})")
        if spec["method"] == "act_quant":
            extra = sorted(set(spec) - {"method", "bits"})
            if extra or "bits" not in spec:
                raise errors.UserError(f"an act_quant entry takes exactly one argument, bits (got {spec})")
            out.append(ActQuant(act_quant.check_bits(spec["bits"])))
            continue
        out.append(registry.make(spec.pop("method"), **spec))
    if all(isinstance(x, int) for x in out):
        raise errors.UserError("the compress list names no method")
    if sum(isinstance(x, ActQuant) for x in out) > 1:
        raise errors.UserError("the compress list has more than one act_quant entry")
    return out


def build(specs) -> core.Transform:
    """The chain of transforms a config's `compress` list names ({"finetune": steps} and act_quant entries aside)."""
    ts = [x for x in members(specs) if isinstance(x, core.Transform)]
    return ts[0] if len(ts) == 1 else core.chain(*ts)


def validate(cfg: mlc.ConfigDict) -> None:
    if not cfg.model:
        raise errors.UserError("set the model to compress: --config.model=RUN_DIR (or an HF directory / hub id)")
    f = cfg.finetune

    def integer(name, value, low):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise errors.UserError(f"{name} must be an integer >= {low}, got {value!r}")

    integer("finetune.steps", f.steps, 0)
    integer("finetune.log_every", f.log_every, 1)
    integer("data.batch_size", cfg.data.batch_size, 1)
    integer("calibration.n", cfg.calibration.n, 0)
    integer("calibration.batch_size", cfg.calibration.batch_size, 1)
    if f.steps and (f.lr <= 0 or f.min_lr < 0 or f.warmup_steps < 0):
        raise errors.UserError("finetune.lr must be > 0, finetune.min_lr >= 0 and finetune.warmup_steps >= 0")
    specs = [dict(x) for x in cfg.compress]
    for i, spec in enumerate(specs):
        if spec.get("method") == "gradual":
            # Its fine-tuning is the next {"finetune": N} stage after it, or the final fine-tune without one.
            stage = next((s["finetune"] for s in specs[i + 1 :] if set(s) == {"finetune"}), None)
            end = spec.get("start", 0) + spec.get("steps", 1000)
            have, name = (f.steps, "finetune.steps") if stage is None else (stage, f"the {{'finetune': {stage}}} stage")
            if isinstance(have, int) and have < end:
                fix = f"--config.finetune.steps={end}" if stage is None else f"a {{'finetune': {end}}} stage"
                raise errors.UserError(
                    f"gradual pruning ends at step {end} but {name} runs {have} steps: the final sparsity would "
                    f"never be reached; use {fix} or more (more leaves recovery steps)"
                )
        if registry.needs_calibration(spec) and not cfg.calibration.n:
            raise errors.UserError(f"{spec['method']} needs calibration data: set calibration.n > 0")
    if "pack" in cfg:
        raise errors.UserError("compress always writes model.zlm now: drop the config's 'pack' entry")
    if cfg.get("shrink") and [dict(x).get("method") for x in cfg.compress] != ["structured"]:
        raise errors.UserError("shrink applies to a compress list holding exactly one 'structured' entry")


def run(cfg: mlc.ConfigDict, workdir: str | Path, *, overwrite: bool = False, progress: bool | None = None) -> dict:
    """Runs a compress config; returns the summary (also written to `workdir/summary.json`).

    Raises:
      UserError: bad config, model or data, a non-empty `workdir` without `overwrite`, or non-finite weights
        after compression (nothing is written then).
    """
    times: dict = {}
    t0 = time.time()
    validate(cfg)
    members(cfg.compress)  # every entry checked before the model is loaded
    out = Path(workdir).expanduser().resolve()
    atomic = files.AtomicDir(out, overwrite)
    m = sources.load(cfg.model, cfg.step)
    run_cfg = m.run_config
    tok_spec = cfg.data.tokenizer or m.tokenizer
    if tok_spec is None:
        raise errors.UserError(f"{cfg.model} names no tokenizer: set --config.data.tokenizer (byte or hf:DIR)")
    tok = tokenizers.load(tok_spec)
    corpus = cfg.data.corpus or (run_cfg.data.corpus if run_cfg else None) or cfg.calibration.get("corpus")
    if corpus is None:
        raise errors.UserError(f"{cfg.model} is not a run of ours: set --config.data.corpus (e.g. a text file)")
    val_fraction = run_cfg.data.val_fraction if (run_cfg and not cfg.data.corpus) else cfg.data.val_fraction
    splits = dataset.prepare(corpus, tok, val_fraction)
    # A pretrained model's context can be far longer than its evaluation protocol needs (SmolLM2: 8,192).
    seq_len = cfg.data.seq_len or (run_cfg.data.seq_len if run_cfg else min(m.cfg.max_seq_len, 2048))
    window = cfg.eval.window or seq_len
    eval_tokens = splits.val
    if cfg.eval.get("corpus"):
        eval_tokens = np.asarray(dataset.tokenize_cached(corpora.load(cfg.eval.corpus).text, tok), np.int32)
    style = cfg.eval.get("protocol", "windows")
    if style not in ("windows", "gptq"):
        raise errors.UserError(f"eval.protocol must be 'windows' or 'gptq', got {style!r}")
    if style == "gptq":  # as `tokenizer(text)` in the reference code: the tokenizer's default prefix first
        eval_tokens = np.concatenate([tok.added_prefix, eval_tokens]).astype(np.int32)
    calib_tokens = splits.train
    if cfg.calibration.get("corpus"):
        calib_tokens = np.asarray(dataset.tokenize_cached(corpora.load(cfg.calibration.corpus).text, tok), np.int32)
    for name, value in (("data.seq_len", seq_len), ("eval.window", window)):
        if value > m.cfg.max_seq_len:
            raise errors.UserError(f"{name} ({value}) exceeds the model's context ({m.cfg.max_seq_len})")
    # The list, parsed once, with what only the model knows filled in: heads are units of its head width.
    specs = [dict(x) for x in cfg.compress]
    specs = [{"head_dim": m.cfg.dim_head, **x} if x.get("method") == "structured" else x for x in specs]
    parts = members(specs)
    transforms = [x for x in parts if isinstance(x, core.Transform)]
    transform = transforms[0] if len(transforms) == 1 else core.chain(*transforms)
    if style == "gptq":
        if cfg.eval.stride not in (None, window):
            raise errors.UserError("eval.stride does not apply to the gptq protocol (its windows are disjoint)")
        protocol = metrics.Protocol.gptq(window)
    else:
        protocol = metrics.Protocol(window, cfg.eval.stride or window)
    bits = next((x.bits for x in parts if isinstance(x, ActQuant)), None)
    out_cfg = m.cfg if bits is None else m.cfg.replace(act_bits=bits)
    out_graphdef = m.graphdef if bits is None else models.abstract(out_cfg)[0]
    times["load"] = time.time() - t0

    def evaluate(params, desc, graphdef=m.graphdef):
        dense = params is m.params and graphdef is m.graphdef
        return metrics.evaluate(
            graphdef,
            params,
            eval_tokens,
            tok.token_bytes,
            protocol,
            batch_size=cfg.eval.batch_size,
            max_windows=cfg.eval.max_windows,
            progress=progress,
            desc=desc,
            reference=(m.graphdef, m.params) if cfg.eval.get("agreement") and not dense else None,
        )

    t = time.time()
    before = evaluate(m.params, "eval dense") if cfg.eval.get("dense", True) else None
    times["eval_dense"] = time.time() - t

    calib = None
    if any(registry.needs_calibration(x) for x in specs):
        inputs = calib_lib.sample(
            calib_tokens, cfg.calibration.n, cfg.calibration.length, cfg.calibration.seed, m.cfg.max_seq_len
        )
        calib = calib_lib.Calibration(m.graphdef, inputs, cfg.calibration.batch_size)
    t = time.time()
    base, stages, staged_steps = m.params, [], 0
    if any(isinstance(x, int | ActQuant) for x in parts):
        transform, cstate, base, stages, staged_steps = _staged(
            cfg, m, specs, parts, calib, splits.train, seq_len, evaluate, progress, out_graphdef
        )
    else:
        cstate = transform.init(m.params, jax.random.key(cfg.seed), calib)
    effective = jax.block_until_ready(transform.apply(base, cstate))
    times["compress"] = time.time() - t
    _check_finite(effective, "compression")
    at_init = compress_report.summarize(effective, transform.masks(cstate))
    t = time.time()
    after = evaluate(effective, "eval compressed", out_graphdef)
    times["eval_compressed"] = time.time() - t

    def pack_meta(model_cfg):
        return artifact.meta(
            model_cfg,
            tok.spec,
            cfg.model,
            m.kind,
            m.step,
            run_cfg,
            methods=[dict(x) for x in cfg.compress],
            compress_config=json.loads(config_lib.to_json(cfg)),
        )

    packed_at_init = None
    if cfg.finetune.steps or cfg.get("shrink"):  # else the saved model is this one
        t = time.time()
        with tempfile.TemporaryDirectory() as d:  # the same header as model.zlm: sizes comparable to the byte
            packed_at_init = _pack(
                effective, core.export(transform, base, cstate), Path(d) / "m.zlm", pack_meta(out_cfg)
            )
        times["pack_compressed"] = time.time() - t

    with atomic as tmp:
        logger = log.Logger(tmp, cfg.to_dict(), cfg.wandb.to_dict())
        tuned, ft, params = None, None, base
        try:
            if cfg.finetune.steps:
                batches = dataset.Batches(splits.train, cfg.data.batch_size, seq_len, cfg.seed, "random")
                params, cstate, ft = finetune.finetune(
                    out_graphdef,
                    base,
                    transform,
                    cstate,
                    lambda s: batches(s + staged_steps),  # the stream continues after the stages' batches
                    cfg.finetune,
                    seed=cfg.seed,
                    log=logger.log,
                    progress=progress,
                )
                effective = jax.block_until_ready(transform.apply(params, cstate))
                times["finetune"] = ft["seconds"]
                _check_finite(effective, "fine-tuning")
                t = time.time()
                tuned = evaluate(effective, "eval fine-tuned", out_graphdef)
                times["eval_finetuned"] = time.time() - t
                logger.log(cfg.finetune.steps, log.numeric(tuned), split="val")
        finally:
            logger.close()
        sizes = compress_report.summarize(effective, transform.masks(cstate))
        shrunk = None
        if cfg.get("shrink"):
            from research.compress.prune import structured

            out_cfg, effective = structured.shrink(m.cfg, params, cstate)
            t = time.time()
            shrunk = evaluate(effective, "eval shrunk", models.abstract(out_cfg)[0])
            times["eval_shrunk"] = time.time() - t
            shrunk["params"] = sum(int(np.size(x)) for x in tree.flatten(effective).values())
            shrunk["model"] = out_cfg.to_dict()
        summary = {
            "source": cfg.model,
            "methods": [dict(s) for s in cfg.compress],
            "act_bits": out_cfg.act_bits,
            "sparsity": sizes["masked_sparsity"],
            "sparsity_compressed": at_init["masked_sparsity"],
            "nonzero_compressed": at_init["nonzero"],
            "sparsity_all_params": sizes["sparsity"],
            "masked_params": sizes["masked_params"],
            "params": sizes["params"],
            "nonzero": sizes["nonzero"],
            "dense_bytes_fp32": sizes["dense_bytes_fp32"],
            "dense_bytes_bf16": sizes["dense_bytes_bf16"],
            "leaves": sizes["leaves"],
            "calibration": {
                "n": cfg.calibration.n,
                "length": None if calib is None else calib.inputs.shape[1],
                "corpus": cfg.calibration.get("corpus") or f"{corpus} (training split)",
            },
            "eval_corpus": cfg.eval.get("corpus") or f"{corpus} (validation split)",
            "stages": stages,
            "dense": before,
            "compressed": after,
            "finetuned": tuned,
            "shrunk": shrunk,
            "finetune": ft,
            "seconds": {**times, "total": time.time() - t0},
            "workdir": str(out),
        }
        t = time.time()
        exported = {} if shrunk else core.export(transform, params, cstate)
        summary["packed"] = _pack(effective, exported, tmp / "model.zlm", pack_meta(out_cfg), progress)
        summary["packed_compressed"] = packed_at_init or summary["packed"]
        times["pack"] = time.time() - t
        summary["seconds"] = {**times, "total": time.time() - t0}
        files.write_json(tmp / "summary.json", summary)
    return summary


def _staged(cfg, m, specs, parts, calib, train_tokens, seq_len, evaluate, progress, quantized_graphdef):
    """Initialises the members in order, fine-tuning the chain so far at each {"finetune": steps} entry; from an
    act_quant entry on, calibration, fine-tuning and evaluation run on `quantized_graphdef`.

    Returns (the whole chain, its state, the raw parameters after the last fine-tuning, per-stage records, the
    stages' fine-tuning steps in all: the batch stream's position for a fine-tune after them).
    """
    key = jax.random.key(cfg.seed)
    batches = dataset.Batches(train_tokens, cfg.data.batch_size, seq_len, cfg.seed, "random")
    ts, states, raw, stages, offset, graphdef = [], [], m.params, [], 0, m.graphdef
    for i, part in enumerate(parts):
        if isinstance(part, ActQuant):
            graphdef = quantized_graphdef
            if calib is not None:
                calib = dataclasses.replace(calib, graphdef=graphdef)
            continue
        if isinstance(part, int):
            t_cfg = mlc.ConfigDict({**cfg.finetune.to_dict(), "steps": part})
            chain = core.chain(*ts)
            raw, st, info = finetune.finetune(
                graphdef,
                raw,
                chain,
                tuple(states),
                lambda s, o=offset: batches(s + o),
                t_cfg,
                seed=cfg.seed,
                progress=progress,
            )
            states, offset = list(st), offset + part
            effective = chain.apply(raw, tuple(states))
            _check_finite(effective, "fine-tuning")
            before = [x["method"] for x in specs[:i] if "method" in x]
            stages.append({"after": before, "finetune": info, "val": evaluate(effective, f"eval stage {i}", graphdef)})
            continue
        effective = core.chain(*ts).apply(raw, tuple(states)) if ts else raw
        states.append(part.init(effective, jax.random.fold_in(key, len(ts)), calib))
        ts.append(part)
    return core.chain(*ts), tuple(states), raw, stages, offset


def _pack(params, exported: dict, path, meta: dict, progress=False) -> dict:
    """Packs params with the transform's exported codes into `path`; returns `artifact.sizes` of the file."""
    rep = coding_pack.pack(
        jax.tree.map(np.asarray, params), path, meta=meta, exported=codes_lib.to_numpy(exported), progress=progress
    )
    return artifact.sizes(rep)


def _check_finite(params, stage: str) -> None:
    bad = [p for p, x in tree.flatten(params).items() if not bool(np.all(np.isfinite(np.asarray(x))))]
    if bad:
        raise errors.UserError(
            f"{stage} produced non-finite weights in {bad[0]} (and {len(bad) - 1} more); nothing saved"
        )
