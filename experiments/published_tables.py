"""A published OPT-125M table re-run: each row measured beside the paper's number.

    python experiments/published_tables.py sparsegpt --model /path/to/opt-125m
    python experiments/published_tables.py wanda     --model /path/to/opt-125m
    python experiments/published_tables.py gptq      --model /path/to/opt-125m [--windows 16] [--calib 32]

Each row is one `compress` run of `experiments/configs/opt125m.py` (the GPTQ protocol on WikiText-2 raw test, every
2048-token window unless `--windows` takes a prefix; 128 x 2048 calibration tokens of WikiText-2 validation, where
the papers used C4). Rows finished before (`<workdir>/<table>-<row>/summary.json` of the same settings) are not
run again. Prints a table `row | measured | paper` and writes it as JSON (`--out`, default
`experiments/results/published_<table>.json`, which `paper/generate.py` turns into a paper table).

The papers' numbers: only those confirmed from a source at hand are filled in; `-` marks a cell not confirmed
here (the tables' cells are named, so they can be added with their source).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.configs import opt125m  # noqa: E402
from research import errors, files  # noqa: E402
from research.compress import pipeline  # noqa: E402

LABELS = {
    "dense": "dense",
    "magnitude50": "magnitude 50%",
    "wanda50": "Wanda 50%",
    "sparsegpt50": "SparseGPT 50%",
    "magnitude24": "magnitude 2:4",
    "wanda24": "Wanda 2:4",
    "sparsegpt24": "SparseGPT 2:4",
    "rtn4": "RTN 4-bit per channel",
    "gptq4": "GPTQ 4-bit per channel",
    "rtn3": "RTN 3-bit per channel",
    "gptq3": "GPTQ 3-bit per channel",
}

# The published tables: their rows (of opt125m.ROWS) and the paper's WikiText-2 perplexity for OPT-125M where
# confirmed. None: the cell exists in the paper but its value could not be confirmed from a source at hand.
TABLES = {
    "sparsegpt": dict(
        paper="SparseGPT (Frantar and Alistarh, ICML 2023), OPT results on raw WikiText-2",
        # dense 27.66: the FP16 OPT-125M perplexity of the SparseGPT/GPTQ evaluation (raw WikiText-2, 2048-token
        # windows); magnitude / SparseGPT 50% and 2:4 are the paper's OPT table cells, not confirmed here.
        paper_ppl={"dense": 27.66, "magnitude50": None, "sparsegpt50": None, "sparsegpt24": None},
    ),
    "wanda": dict(
        paper="Wanda (Sun et al., ICLR 2024); whether it reports OPT-125M could not be confirmed here",
        paper_ppl={"dense": None, "magnitude50": None, "wanda50": None, "sparsegpt50": None},
    ),
    "gptq": dict(
        paper="GPTQ (Frantar et al., ICLR 2023), Table 3 (OPT, WikiText-2)",
        # RTN / GPTQ at 4 and 3 bits for OPT-125M are Table 3's cells, not confirmed here.
        paper_ppl={"dense": None, "rtn4": None, "gptq4": None, "rtn3": None, "gptq3": None},
    ),
}


def settings(args) -> dict:
    return {"windows": args.windows, "calib": args.calib, "calib_len": args.calib_len, "window": args.window}


def run_row(table: str, row: str, args) -> dict:
    out = Path(args.workdir) / f"{table}-{row}"
    done = out / "summary.json"
    if done.is_file():
        s = json.loads(done.read_text())
        if s.get("published_tables") == settings(args) and s.get("source") == args.model:
            return s
    c = opt125m.get_config(row)
    c.model = args.model
    c.eval.max_windows = args.windows or None
    c.eval.window = args.window
    c.data.seq_len = args.window
    c.eval.dense = row == "dense"
    c.calibration.update(n=args.calib, length=args.calib_len, batch_size=min(4, args.calib))
    t = time.time()
    s = pipeline.run(c, out, overwrite=True, progress=False)
    s["published_tables"] = settings(args)
    s["wall_seconds"] = time.time() - t
    files.write_json(done, s)
    return s


def table_text(rows: list[dict]) -> str:
    lines = [f"{'row':<26} {'measured':>10} {'paper':>10}", f"{'-' * 26} {'-' * 10} {'-' * 10}"]
    for r in rows:
        paper = "-" if r["paper"] is None else f"{r['paper']:.2f}"
        lines.append(f"{r['label']:<26} {r['perplexity']:>10.2f} {paper:>10}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("table", choices=sorted(TABLES))
    p.add_argument("--model", default=opt125m.MODEL, help="HF directory of facebook/opt-125m, or the hub id")
    p.add_argument("--rows", default="", help="comma-separated subset of the table's rows")
    p.add_argument("--windows", type=int, default=0, help="evaluated windows (0: all, the papers' protocol)")
    p.add_argument("--window", type=int, default=2048, help="evaluation window and data.seq_len (tokens)")
    p.add_argument("--calib", type=int, default=128, help="calibration windows")
    p.add_argument("--calib-len", type=int, default=2048, help="tokens per calibration window")
    p.add_argument("--workdir", default=str(ROOT / "runs" / "published"), help="where the rows' runs go")
    p.add_argument("--out", default=None, help="JSON output (default experiments/results/published_<table>.json)")
    args = p.parse_args(argv)
    spec = TABLES[args.table]
    rows = [r for r in args.rows.split(",") if r] or list(spec["paper_ppl"])
    unknown = [r for r in rows if r not in opt125m.ROWS]
    if unknown:
        raise SystemExit(f"error: unknown row(s) {unknown}; rows: {', '.join(opt125m.ROWS)}")
    measured, protocol, calibration = [], None, None
    for row in rows:
        t = time.time()
        try:
            s = run_row(args.table, row, args)
        except errors.UserError as e:
            raise SystemExit(f"error: {row}: {e}") from None
        r = s["dense"] if row == "dense" else s["compressed"]
        protocol = r["protocol"] + f"; WikiText-2 raw test, {r['tokens']:,} scored tokens"
        cal = s.get("calibration") or {}
        calibration = f"{cal.get('n')} x {cal.get('length')} tokens of {cal.get('corpus', '')}".replace(
            str(ROOT.parent), ".."
        )
        measured.append(
            dict(
                row=row,
                label=LABELS[row],
                perplexity=r["perplexity"],
                bits_per_byte=r["bits_per_byte"],
                paper=spec["paper_ppl"].get(row),
                sparsity=s.get("sparsity"),
                seconds=time.time() - t,
            )
        )
        print(f"{row}: perplexity {r['perplexity']:.2f} ({time.time() - t:.0f} s)", flush=True)
    command = f"python experiments/published_tables.py {args.table} --model {args.model}"
    for flag, value, default in (
        ("--windows", args.windows, 0), ("--window", args.window, 2048), ("--calib", args.calib, 128),
        ("--calib-len", args.calib_len, 2048),
    ):  # fmt: skip
        command += f" {flag} {value}" if value != default else ""
    result = dict(
        paper=spec["paper"],
        model=f"OPT-125M ({args.model})",
        protocol=protocol,
        calibration=calibration + " (the papers: 128 x 2048 tokens of C4)",
        command=command,
        rows=measured,
    )
    out = Path(args.out) if args.out else ROOT / "experiments" / "results" / f"published_{args.table}.json"
    files.write_json(out, result)
    print(f"\n{spec['paper']}; OPT-125M, WikiText-2 perplexity ('-': the paper's value not confirmed here)")
    print(table_text(measured))
    print(f"\n{protocol}; calibration: {result['calibration']}. Written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
