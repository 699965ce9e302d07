"""experiments/published_tables.py end to end on a tiny random OPT checkpoint written here (no download)."""

import json
import sys

import jax
import pytest

from research import models
from research.models import config as mc
from research.models import hf
from tests import helpers

ROOT = helpers.REPO


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory):
    """An OPT-layout HF directory with the GPT-2 BPE tokenizer (OPT's), random weights, 2 blocks of width 16."""
    cfg = mc.gpt2_style(vocab_size=50272, n_layer=2, n_head=2, d_model=16, max_seq_len=64, activation="relu")
    _, params = models.init(cfg, 0)
    keys = iter(jax.random.split(jax.random.key(1), 1000))
    params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(next(keys), a.shape), params)
    out = tmp_path_factory.mktemp("opt") / "tiny-opt"
    hf.export(cfg, params, out, model_type="opt", tokenizer=f"hf:{helpers.GPT2_TOKENIZER}")
    return out


@helpers.needs_shared
def test_a_table_runs_end_to_end_and_prints_both_columns(tiny_opt, tmp_path, capsys, monkeypatch):
    sys.path.insert(0, str(ROOT))
    from experiments import published_tables

    out, table, rows = tmp_path / "published.json", "gptq", "dense,gptq3"
    argv = [table, "--model", str(tiny_opt), "--rows", rows, "--windows", "2", "--window", "32", "--calib", "2",
            "--calib-len", "32", "--workdir", str(tmp_path / "runs"), "--out", str(out)]  # fmt: skip
    assert published_tables.main(argv) == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("row"))
    assert "measured" in header and "paper" in header
    result = json.loads(out.read_text())
    assert [r["row"] for r in result["rows"]] == rows.split(",")
    for r in result["rows"]:
        assert r["perplexity"] > 1 and r["label"] in printed
        paper = published_tables.TABLES[table]["paper_ppl"][r["row"]]
        assert r["paper_text"] == paper and r["paper"] == float(paper)
        assert any(line.startswith(r["label"]) and line.endswith(f" {paper}") for line in printed.splitlines())
    assert result["command"].startswith(f"python experiments/published_tables.py {table} --model ")
    assert "32 tokens" in result["protocol"] or "windows of 32" in result["protocol"]
    # a second run finds every row finished and runs nothing
    monkeypatch.setattr(published_tables.pipeline, "run", lambda *a, **k: pytest.fail("row run again"))
    assert published_tables.main(argv) == 0


def test_every_table_row_is_a_config_row():
    sys.path.insert(0, str(ROOT))
    from experiments import published_tables
    from experiments.configs import opt125m

    for spec in published_tables.TABLES.values():
        assert set(spec["paper_ppl"]) <= set(opt125m.ROWS)
    for row in opt125m.ROWS:
        c = opt125m.get_config(row)
        assert c.eval.protocol == "gptq" and c.eval.window == 2048 and c.calibration.n == 128
