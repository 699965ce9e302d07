"""paper/: the committed tables and numbers are what `paper/generate.py` makes from the committed result files, and
paper.tex uses only generated files and macros that exist."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "paper"
COMMITTED = PAPER / "generated"


def _generate_module():
    spec = importlib.util.spec_from_file_location("paper_generate", PAPER / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper")
    _generate_module().generate(out)
    return out


def test_generated_tables_match_the_committed_ones(regenerated):
    fresh = {p.name for p in regenerated.iterdir() if p.suffix in (".tex", ".md")}
    committed = {p.name for p in COMMITTED.iterdir() if p.suffix in (".tex", ".md")}
    assert fresh == committed, (
        f"paper/generated/ differs from what the result files give: missing {sorted(fresh - committed)}, stale "
        f"{sorted(committed - fresh)}; run make paper and commit paper/generated/"
    )
    for name in sorted(fresh):
        new, old = (regenerated / name).read_bytes(), (COMMITTED / name).read_bytes()
        assert new == old, f"paper/generated/{name} is not what the result files give; run make paper and commit it"


def test_figures_exist_and_are_not_empty(regenerated):
    figures = sorted(p.name for p in regenerated.iterdir() if p.suffix in (".pdf", ".png"))
    assert figures, "generate.py made no figure"
    for name in figures:
        assert (regenerated / name).stat().st_size > 1000, name
        committed = COMMITTED / name
        assert committed.is_file() and committed.stat().st_size > 1000, f"paper/generated/{name}: run make paper"


def test_paper_uses_only_generated_files_and_defined_numbers():
    text = (PAPER / "paper.tex").read_text()
    body = "\n".join(line.split("%", 1)[0] if not line.lstrip().startswith("%") else "" for line in text.splitlines())
    used_files = re.findall(r"\\(?:input|includegraphics)(?:\[[^\]]*\])?\{([^}]+)\}", body)
    assert used_files, "paper.tex includes no generated file"
    for name in used_files:
        path = PAPER / name
        assert path.is_file() or path.with_suffix(".tex").is_file(), f"paper.tex uses {name}, which does not exist"
    numbers = (COMMITTED / "numbers.tex").read_text()
    defined = set(re.findall(r"\\newcommand\{\\([A-Za-z]+)\}", numbers))
    latex_or_own = set(re.findall(r"\\newcommand\{\\([A-Za-z]+)\}", body))
    # numbers.tex's macros: a family prefix, then a capital (\textbf and \texttt are LaTeX's)
    family = r"\\((?:prune|quant|frontier|tiny|text|llm|deploy|pack)[A-Z][A-Za-z]*)"
    used = set(re.findall(family, body)) - latex_or_own
    missing = sorted(used - defined)
    assert not missing, f"paper.tex uses numbers that numbers.tex does not define: {missing}; run make paper"


def test_a_missing_result_file_skips_its_table(tmp_path, monkeypatch, capsys):
    gen = _generate_module()
    monkeypatch.setattr(gen, "EXPERIMENTS", tmp_path / "none")
    monkeypatch.setattr(gen, "BENCHMARKS", tmp_path / "none")
    written = gen.generate(tmp_path / "out")
    assert [p.name for p in written] == ["numbers.tex"]
    assert "prune_study skipped" in capsys.readouterr().out


def test_optional_lastword_column(tmp_path, monkeypatch):
    gen = _generate_module()
    src = tmp_path / "results"
    src.mkdir()
    d = json.loads((gen.EXPERIMENTS / "llm_tables.json").read_text())
    d["rows"][0]["lastword"] = {"accuracy": 0.25}
    (src / "llm_tables.json").write_text(json.dumps(d))
    monkeypatch.setattr(gen, "EXPERIMENTS", src)
    gen.generate(tmp_path / "out")
    md = (tmp_path / "out" / "llm_tables.md").read_text()
    assert "last word acc." in md and "0.250" in md


def test_a_published_table_result_becomes_a_table(tmp_path, monkeypatch):
    gen = _generate_module()
    src = tmp_path / "results"
    src.mkdir()
    rows = [dict(row="gptq3", label="GPTQ 3-bit per channel", perplexity=60.0, paper=53.85, paper_text="53.85")]
    (src / "published_gptq.json").write_text(json.dumps(dict(paper="GPTQ", protocol="p", command="c", rows=rows)))
    monkeypatch.setattr(gen, "EXPERIMENTS", src)
    gen.generate(tmp_path / "out")
    md = (tmp_path / "out" / "published_gptq.md").read_text()
    assert "| GPTQ 3-bit per channel | 60.00 | 53.85 |" in md
