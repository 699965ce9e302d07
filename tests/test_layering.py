"""The package's layering: `models/` and `data/` import nothing from `compress/`, `train/`, `eval/` or `coding/`,
and evaluation and compression do not import the trainer."""

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
}


@pytest.mark.parametrize("modules, forbidden", LAYERS.items(), ids=["models-data", "eval-compress"])
def test_lower_layers_do_not_import_higher_ones(modules, forbidden):
    code = f"import sys; import {modules}; print(sorted(m for m in sys.modules if m.startswith({forbidden!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]", out.stdout
