"""The package's layering: `models/` and `data/` import nothing from `compress/`, `train/`, `eval/` or `coding/`,
evaluation and compression do not import the trainer, and `parallel/` (mesh, shardings, processes) imports none
of the layers that use it."""

import subprocess
import sys

import pytest

from tests.helpers import REPO

LAYERS = {
    "research.models, research.models.gguf, research.models.hf, research.models.decode, research.models.zoo, "
    "research.data.dataset, research.data.tokenizers": (
        "research.compress",
        "research.train",
        "research.eval",
        "research.coding",
    ),
    "research.eval.metrics, research.compress.prune.structured, research.compress.calib": ("research.train",),
    "research.parallel.distributed, research.parallel.sharding": (
        "research.models",
        "research.compress",
        "research.train",
        "research.eval",
        "research.coding",
    ),
}


@pytest.mark.parametrize("modules, forbidden", LAYERS.items(), ids=["models-data", "eval-compress", "parallel"])
def test_lower_layers_do_not_import_higher_ones(modules, forbidden):
    code = f"import sys; import {modules}; print(sorted(m for m in sys.modules if m.startswith({forbidden!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def _import_graph() -> dict:
    """{module: modules of research it imports}, from the source (function-level imports included); importing a
    submodule counts as importing its packages too."""
    import ast

    root = REPO / "research"
    mods = {}
    for f in root.rglob("*.py"):
        name = ".".join(f.relative_to(REPO).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = f
    graph = {}
    for m, f in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("research"):
                deps |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("research")}
        prefixes = {".".join(d.split(".")[:i]) for d in deps for i in range(2, d.count(".") + 2)}
        graph[m] = {p for p in prefixes if p in mods and p != m and not m.startswith(p + ".")}
    return graph


def test_no_import_cycles():
    graph = _import_graph()
    state: dict = {}  # 1: on the current path, 2: done

    def visit(m, path):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d) :] + [d]))
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert "research.compress.pipeline" in graph["research.cli"] and len(graph) > 50  # the graph is real
