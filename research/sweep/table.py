"""A sweep's result table: one row per point (its axis values, status and collected metrics), written as JSONL,
CSV and Markdown, and plotted from declared x / y / hue.

`collect` in the sweep config maps a column to a dotted path in the point's result (summary.json of train /
compress, result.json of eval / encode; a number indexes a list: "allocation.0.file_bytes"). The path "final.X"
is the fine-tuned metric X where the compress job fine-tuned, else the one-shot one. Without `collect`, each job
has its defaults (`DEFAULTS`). `plot` is one dict or a list of them: x, y, hue (optional), logx / logy, title,
file (default "<y>_vs_<x>.png"); a plot's columns are any of the table's.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from research import errors, files
from research.sweep import jobs
from research.sweep import points as points_lib

DEFAULTS = {
    "compress": {
        "loss": "compressed.loss",
        "bits_per_byte": "compressed.bits_per_byte",
        "final_loss": "final.loss",
        "final_bits_per_byte": "final.bits_per_byte",
        "sparsity": "sparsity",
        "file_bytes": "packed.file_bytes",
        "bits_per_weight": "packed.bits_per_weight",
        "ratio_vs_fp32": "packed.ratio_vs_fp32",
    },
    "train": {
        "val_loss": "val.loss",
        "val_bits_per_byte": "val.bits_per_byte",
        "steps": "steps",
        "tokens_per_second": "tokens_per_second",
    },
    "eval": {"loss": "loss", "bits_per_byte": "bits_per_byte", "perplexity": "perplexity", "tokens": "tokens"},
    "encode": {
        "bits_per_byte": "bits_per_byte",
        "ideal_bits_per_byte": "ideal_bits_per_byte",
        "input_bytes": "input_bytes",
        "coded_bytes": "coded_bytes",
        "tokens_per_s": "tokens_per_s",
        "roundtrip": "roundtrip",
    },
}


def lookup(result: dict, path: str):
    """The value at dotted `path` in `result` (None where it is missing)."""
    parts = path.split(".")
    if parts[0] == "final":
        parts[0] = "finetuned" if isinstance(result.get("finetuned"), dict) else "compressed"
    node = result
    for part in parts:
        if isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node


def rows(sweep, pts, workdir: Path) -> list[dict]:
    """Every point's row: point, status, the axis columns, labels, seconds and the collected metrics."""
    collect = dict(sweep.get("collect") or DEFAULTS[sweep.job])
    keys = sorted({k for p in pts for k in p.overrides})
    out = []
    for p in pts:
        point_dir = workdir / p.name
        cfg = jobs.config(sweep, p)
        state = jobs.status(sweep.job, cfg, point_dir)
        row = dict(point=p.name, status=state, **p.labels)
        for k, v in p.overrides.items():
            name = points_lib.column(k, keys)
            row[k if name in collect else name] = v if not isinstance(v, list | dict) else points_lib.show(v)
        marker = read(point_dir / "point.json")
        row["seconds"] = marker.get("seconds") if state == "done" else None
        result = read(point_dir / jobs.RESULT[sweep.job]) if state == "done" else {}
        for column, path in collect.items():
            row[column] = lookup(result, path) if result else None
        if state == "failed":
            row["error"] = marker.get("error")
        row["overrides"] = p.overrides
        out.append(row)
    return out


def read(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def write(sweep, table: list[dict], workdir: Path) -> list[Path]:
    """results.jsonl / .csv / .md and the plots in `workdir`; returns the paths written."""
    workdir.mkdir(parents=True, exist_ok=True)
    jsonl = "".join(json.dumps(r, default=str) + "\n" for r in table)
    written = [files.write_bytes(workdir / "results.jsonl", jsonl.encode())]
    flat = [{k: v for k, v in r.items() if k != "overrides"} for r in table]
    columns = list(dict.fromkeys(k for r in flat for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, columns, lineterminator="\n")
    w.writeheader()
    for r in flat:
        w.writerow({k: _cell(r.get(k), csv_=True) for k in columns})
    written.append(files.write_bytes(workdir / "results.csv", buf.getvalue().encode()))
    written.append(files.write_bytes(workdir / "results.md", markdown(flat, columns).encode()))
    for spec in _plots(sweep):
        if any(r["status"] == "done" for r in table):
            written.append(plot(table, spec, workdir / spec.get("file", f"{spec['y']}_vs_{spec['x']}.png")))
    return written


def markdown(flat: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in flat:
        lines.append("| " + " | ".join(_cell(r.get(k)) for k in columns) + " |")
    return "\n".join(lines) + "\n"


def _cell(v, csv_: bool = False) -> str:
    if v is None:
        return "" if csv_ else "—"
    if isinstance(v, float):
        return repr(v) if csv_ else (f"{v:.4g}" if math.isfinite(v) else str(v))
    if isinstance(v, list | dict):
        return json.dumps(v)
    return str(v).replace("|", "\\|") if not csv_ else str(v)


def _plots(sweep) -> list[dict]:
    spec = sweep.get("plot")
    if spec is None:
        return []
    specs = [spec] if not isinstance(spec, list | tuple) else list(spec)
    out = []
    for s in specs:
        s = dict(s)
        if "x" not in s or "y" not in s:
            raise errors.UserError(f"a sweep plot needs x and y columns, got {s}")
        out.append(s)
    return out


def plot(table: list[dict], spec: dict, path: Path) -> Path:
    """y against x of the finished points, one line per hue value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y, hue = spec["x"], spec["y"], spec.get("hue")
    done = [r for r in table if r["status"] == "done" and r.get(y) is not None and r.get(x) is not None]
    numeric = all(isinstance(r[x], int | float) for r in done)
    ticks = list(dict.fromkeys(str(r[x]) for r in done)) if not numeric else None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = dict.fromkeys(r.get(hue) for r in done) if hue else {None: None}
    for g in groups:
        mine = [r for r in done if hue is None or r.get(hue) == g]
        xs = [r[x] if numeric else ticks.index(str(r[x])) for r in mine]
        order = sorted(range(len(mine)), key=lambda i: xs[i])
        ax.plot([xs[i] for i in order], [mine[i][y] for i in order], "o-", label=None if g is None else str(g))
    if ticks:
        ax.set_xticks(range(len(ticks)), ticks, rotation=30, ha="right", fontsize=8)
    ax.set_xscale("log" if spec.get("logx") else "linear")
    ax.set_yscale("log" if spec.get("logy") else "linear")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(spec.get("title", f"{y} vs {x}"))
    ax.grid(alpha=0.3)
    if hue:
        ax.legend(title=hue, fontsize=8)
    fig.tight_layout()
    with files.atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return path
