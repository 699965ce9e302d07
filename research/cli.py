"""Command line: `ziplm <command>` (or `python -m research <command>`); no command runs the demo.

    ziplm demo  [--workdir runs/demo]
    ziplm train --config experiments/configs/shakespeare_char_cpu.py [--workdir DIR] [--config.train.lr=3e-4 ...]
    ziplm eval  --workdir DIR [--corpus SPEC] [--split val|train|all] [--window W] [--stride S] [--json OUT]

A mistake in the input (a missing file, an unknown config key, a bad value) prints one line, "error: ...", and
exits with status 2; an interrupted run exits with 130 after saving a checkpoint.
"""

from __future__ import annotations

import argparse
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
    print(report.train_table(summary))
    return 0


def _eval(args, overrides) -> int:
    from research import report
    from research.data import corpora, dataset, tokenizers
    from research.eval import metrics
    from research.train import checkpoint

    if overrides:
        raise errors.UserError(f"unrecognised argument {overrides[0]!r} for eval (see ziplm eval --help)")
    cfg, graphdef, params, meta = checkpoint.load_run(args.workdir, args.step)
    tok = tokenizers.load(meta["tokenizer"])
    spec = args.corpus or cfg.data.corpus
    if args.split == "all":
        tokens = dataset.tokenize_cached(corpora.load(spec).text, tok)
    else:
        splits = dataset.prepare(spec, tok, cfg.data.val_fraction)
        tokens = splits.val if args.split == "val" else splits.train
    window = _first(args.window, cfg.eval.window, cfg.data.seq_len)
    stride = _first(args.stride, cfg.eval.stride if args.window is None else None, window)
    if window > cfg.model.max_seq_len:
        raise errors.UserError(f"--window {window} exceeds the model's context ({cfg.model.max_seq_len})")
    protocol = metrics.Protocol(window, stride)
    batch_size = _first(args.batch_size, cfg.eval.batch_size)
    result = metrics.evaluate(graphdef, params, tokens, tok.token_bytes, protocol, batch_size=batch_size)
    result.update(corpus=spec, split=args.split, step=meta["step"], workdir=str(args.workdir))
    print(report.eval_table(result))
    if args.json:
        from research import log

        log.write_json_atomic(Path(args.json), result)
    return 0


def _first(*values):
    """The first value that is not None (so an explicit 0 reaches validation instead of becoming a default)."""
    return next(v for v in values if v is not None)


def _demo(args, overrides) -> int:
    from research import demo

    return demo.main(args.workdir or "runs/demo", overrides)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ziplm", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command")
    d = sub.add_parser("demo", help="train, evaluate and summarise the default model on the embedded corpus")
    d.add_argument("--workdir", help="run directory (default runs/demo; an existing demo run is resumed)")
    t = sub.add_parser(
        "train", help="train a model from a config file", epilog="Any --config.KEY=VALUE overrides that config entry."
    )
    t.add_argument("--config", help="config file with get_config() (default: the demo's base config)")
    t.add_argument("--workdir", help="run directory (default runs/<config name>); resumed if it holds this run")
    e = sub.add_parser("eval", help="evaluate a trained run's checkpoint")
    e.add_argument("--workdir", required=True, help="run directory written by `ziplm train`")
    e.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    e.add_argument("--corpus", help="corpus spec (default: the run's corpus); see research/data/corpora.py")
    e.add_argument("--split", choices=["val", "train", "all"], default="val", help="which part of the corpus")
    e.add_argument("--window", type=int, help="context window in tokens (default: the run's eval window)")
    e.add_argument("--stride", type=int, help="tokens between window starts (default: window, non-overlapping)")
    e.add_argument("--batch-size", type=int, help="windows per forward pass")
    e.add_argument("--json", help="also write the result to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    args, rest = parser.parse_known_args(argv or ["demo"])
    if args.command is None:
        parser.print_help()
        return 2
    from research.train import loop

    handlers = {"train": _train, "eval": _eval, "demo": _demo}
    try:
        return handlers[args.command](args, rest)
    except errors.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except loop.Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
