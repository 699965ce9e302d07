"""experiments/llm_tables.py's table bookkeeping: which committed rows a run keeps, and the table it writes to --out
(the compress runs themselves need SmolLM2; they are measured by the script, not here)."""

import json
import sys

import pytest

from research import files
from tests import helpers

sys.path.insert(0, str(helpers.REPO))
from experiments import llm_tables  # noqa: E402


def _row(name, ppl=30.0):
    return dict(row=name, label=llm_tables.label(name), perplexity=ppl, packed_bytes=70_000_000, ratio_vs_fp32=7.7,
                bits_per_weight=4.2, bits_per_byte=1.2, tokens=32752, protocol="p")  # fmt: skip


@pytest.mark.parametrize("windows, calib, kept", [(16, 16, ["rtn4_g128"]), (0, 16, []), (16, 128, [])])
def test_only_rows_of_the_same_windows_and_calibration_are_kept(tmp_path, windows, calib, kept):
    path = tmp_path / "llm_tables_gpu.json"
    meta = {"windows": 16, "calibration": "16 x 2048 tokens at seeded random offsets of x"}
    files.write_json(path, {"meta": meta, "rows": [_row("dense", 20.7), _row("rtn4_g128")]})
    got = llm_tables.committed_rows(path, windows, calib, skip={"dense"})
    assert [r["row"] for r in got] == kept


def test_a_missing_table_keeps_nothing(tmp_path):
    assert llm_tables.committed_rows(tmp_path / "none.json", 16, 16, skip=set()) == []


def test_the_written_table_names_its_out_path_in_its_command(tmp_path, monkeypatch):
    """The meta command of a table written to --out reruns into the same file (the GPU table is not the CPU one)."""
    out = tmp_path / "gpu" / "llm_tables_gpu"
    summary = {"devices": {"kind": "1 x NVIDIA H200", "jax": "0.11.2", "host_cpus": 16}, "calibration": {"corpus": "c"}}
    monkeypatch.setattr(llm_tables, "run_row", lambda row, w, c, d: summary)
    monkeypatch.setattr(llm_tables, "cached", lambda *a: None)
    monkeypatch.setattr(llm_tables, "collect", lambda s: [_row("dense", 21.6)])
    monkeypatch.setattr(llm_tables.zoo, "cached", lambda name: tmp_path / "model.gguf")
    (tmp_path / "model.gguf").write_bytes(b"x" * 100)
    monkeypatch.setattr(llm_tables, "WIKITEXT_RAW", tmp_path / "model.gguf")
    monkeypatch.setattr(llm_tables, "plot", lambda rows, path, source: path.write_bytes(b"png"))
    monkeypatch.setattr(llm_tables, "markdown", lambda rows, meta: "table\n")
    committed = llm_tables.RESULTS / "llm_tables.json"
    before = committed.stat().st_mtime_ns if committed.exists() else None
    argv = ["llm_tables.py", "--rows", "dense", "--windows", "0", "--calib", "128", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    assert llm_tables.main() == 0
    d = json.loads(out.with_suffix(".json").read_text())
    assert d["meta"]["command"].endswith(f"--rows dense --out {out}")
    assert d["meta"]["machine"].endswith("jax 0.11.2, 1 x NVIDIA H200")  # where the rows ran, from their summaries
    assert out.with_suffix(".md").read_text() == "table\n" and out.with_suffix(".png").is_file()
    assert (committed.stat().st_mtime_ns if committed.exists() else None) == before  # the CPU table is untouched
