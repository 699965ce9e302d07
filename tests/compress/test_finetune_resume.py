"""Fine-tuning under a chain (prune -> fine-tune -> quantize -> fine-tune) runs through the trainer's loop:
checkpointed in `.<out>.partial/`, and resumed bit-identically after SIGTERM or kill -9."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from research import cli, sources, tree
from tests import helpers
from tests.test_cli import TINY

CHAIN = (
    "--config.compress=[{'method': 'magnitude', 'sparsity': 0.5}, {'finetune': 6}, "
    "{'method': 'rtn', 'bits': 4, 'granularity': 'channel'}]"
)
ARGS = [CHAIN, "--config.finetune.steps=6", "--config.finetune.ckpt_every=1", "--config.finetune.log_every=1"]
ARGS += ["--config.eval.max_windows=2", "--config.calibration.n=0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("ftresume") / "run"
    assert cli.main(["train", "--workdir", str(path), *TINY]) == 0
    return path


def _args(run, out):
    return ["compress", "--model", str(run), "--workdir", str(out), *ARGS]


def _params(out):
    return {k: np.asarray(v) for k, v in tree.flatten(sources.load(str(out)).params).items()}


# Every run in a subprocess: one CPU device in each (the test process forces 8, and XLA's CPU reductions may
# differ in the last bit between the two settings).
ENV = {**os.environ, "WANDB_MODE": "disabled"}


@pytest.fixture(scope="module")
def full(run, tmp_path_factory):
    """The uninterrupted run both interrupted ones are compared with."""
    out = tmp_path_factory.mktemp("ftresume-full") / "full"
    r = subprocess.run(
        [sys.executable, "-m", "research", *_args(run, out)], env=ENV, cwd=helpers.REPO, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_interrupted_chain_finetune_resumes_bit_identically(run, full, tmp_path, sig):
    env = ENV
    out = tmp_path / "cut"
    partial = tmp_path / ".cut.partial"
    proc = subprocess.Popen(
        [sys.executable, "-m", "research", *_args(run, out)], env=env, cwd=helpers.REPO, stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    deadline = time.time() + 300
    # Stop in the second stage (the final fine-tune, after the quantizer was initialised on stage one's result).
    while time.time() < deadline and not (partial / "finetune" / "checkpoints" / "2").exists():
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == (143 if sig == signal.SIGTERM else -9), err
    if sig == signal.SIGTERM:
        assert "interrupted: stopped at fine-tuning step" in err and "Traceback" not in err
    assert not out.exists() and partial.is_dir()
    r = subprocess.run(
        [sys.executable, "-m", "research", *_args(run, out)], env=env, cwd=helpers.REPO, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert not partial.exists()
    a, b = json.loads((full / "summary.json").read_text()), json.loads((out / "summary.json").read_text())
    assert b["finetune"]["resumed_from"] is not None
    assert a["finetuned"]["loss"] == b["finetuned"]["loss"]
    assert a["stages"][0]["val"]["loss"] == b["stages"][0]["val"]["loss"]
    pa, pb = _params(full), _params(out)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
    losses = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
    assert [r["step"] for r in losses] == list(range(1, 13))  # one trajectory: stage 1..6, final 7..12
