"""The analysis notebooks (notebooks/*.ipynb): each runs top to bottom against the committed result files and draws
at least one figure; the committed files carry no outputs; and they only read result files (no JAX, no `research`,
no writes), so they open in seconds on any machine with the results.

Execution works on an in-memory copy of each notebook: nothing is written back into the repository.
"""

import ast
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
IDS = [p.stem for p in NOTEBOOKS]
# What a notebook may import: the analysis stack and the standard library's file and text helpers.
ALLOWED_IMPORTS = {"json", "pathlib", "re", "matplotlib", "pandas"}
# Calls that would write files or draw on the package: a notebook that reads results needs none of them.
FORBIDDEN_CALLS = {"open", "write_text", "write_bytes", "savefig", "to_csv", "to_json", "to_parquet", "mkdir", "dump"}
# A sentinel cell appended to the executed copy: the kernel must run in this interpreter's environment.
PREFIX_CHECK = "import sys\nprint(sys.prefix)"


def code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def test_there_are_three_to_five_notebooks():
    assert 3 <= len(NOTEBOOKS) <= 5, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs_and_draws(path, monkeypatch):
    """Executes a copy of the notebook; odd-numbered ones from the repository root, the others from notebooks/, so
    both starting points of the notebooks' root search are exercised."""
    # ipykernel picks the inline backend unless MPLBACKEND says otherwise (Agg would draw nothing into the outputs).
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PREFIX_CHECK))
    cwd = ROOT if NOTEBOOKS.index(path) % 2 else path.parent
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    client.execute()  # raises CellExecutionError on the first failing cell, with its traceback

    outputs = [o for c in code_cells(nb) for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, f"{path.name} drew no figure"
    prefix = "".join(o.get("text", "") for o in code_cells(nb)[-1].outputs).strip()
    assert prefix == sys.prefix, f"the python3 kernel ran in {prefix}, not in {sys.prefix}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    for i, cell in enumerate(code_cells(nb)):
        assert cell.outputs == [], f"{path.name}: code cell {i} has outputs"
        assert cell.execution_count is None, f"{path.name}: code cell {i} has an execution count"
    assert nb.cells[0].cell_type == "markdown", "the first cell says what the notebook shows and how to regenerate"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_only_reads_result_files(path):
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(code_cells(nb)):
        tree = ast.parse(cell.source)  # also rejects IPython magics, which a plain script would not run
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                modules = []
            for m in modules:
                assert m.split(".")[0] in ALLOWED_IMPORTS, f"{path.name}: code cell {i} imports {m}"
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                assert name not in FORBIDDEN_CALLS, f"{path.name}: code cell {i} calls {name}()"
