"""Resumable calibration (`compress.journal`): a compress killed during the block walk (SIGKILL at a block boundary
and mid-block, or an exception) resumes at its first unfinished block and writes the same packed file, byte for
byte, as an uninterrupted run; damaged or foreign journal entries are recomputed, never used."""

import json
import subprocess
import sys

import numpy as np
import pytest

from research import cli
from research.compress import calib, journal
from tests import helpers
from tests.test_cli import TINY

LAYERS = ["--config.model.n_layer=3"]  # three blocks to walk
GPTQ = "--config.compress=[{'method': 'gptq', 'bits': 4, 'granularity': 'group', 'group_size': 16}]"
SPARSEGPT = "--config.compress=[{'method': 'sparsegpt', 'sparsity': 0.5}]"
COMMON = ["--config.calibration.n=8", "--config.calibration.length=32", "--config.eval.max_windows=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("calibresume") / "run"
    assert cli.main(["train", "--workdir", str(path), *TINY, *LAYERS]) == 0
    return path


def _compress(run, out, method, extra=()):
    return ["compress", "--model", str(run), "--workdir", str(out), method, *COMMON, *extra]


def _cli(args):
    return subprocess.run([sys.executable, "-m", "research", *args], capture_output=True, text=True, cwd=helpers.REPO,
                          timeout=600)  # fmt: skip


# Runs `ziplm compress` in this process and SIGKILLs it at a chosen point of the walk: after block K's journal entry
# is written ("boundary"), or inside block K's visit, before its entry exists ("mid").
_KILLER = """
import os, signal, sys, json
from research import cli
from research.compress import calib, journal
where, block = sys.argv[1], int(sys.argv[2])
args = json.loads(sys.argv[3])
if where == "boundary":
    put = journal.Journal.put
    def put_then_die(self, i, key, value):
        put(self, i, key, value)
        if i == block:
            os.kill(os.getpid(), signal.SIGKILL)
    journal.Journal.put = put_then_die
else:
    walk = calib.walk
    def walk_dying(c, params, paths, visit, *a, **k):
        def visit_dying(i, *v):
            if i == block:
                os.kill(os.getpid(), signal.SIGKILL)
            return visit(i, *v)
        return walk(c, params, paths, visit_dying, *a, **k)
    calib.walk = walk_dying  # gptq and sparsegpt call calib.walk through the module
sys.exit(cli.main(args))
"""


@pytest.mark.parametrize("method, where", [(GPTQ, "boundary"), (GPTQ, "mid"), (SPARSEGPT, "mid")])
def test_killed_walk_resumes_to_the_same_file(run, tmp_path, method, where):
    # Every run in a subprocess of the same environment (the test process forces 8 CPU devices, which splits XLA's
    # threads otherwise: SparseGPT's masks then differ in their last bits, as on another machine).
    whole = tmp_path / "whole"
    assert _cli(_compress(run, whole, method)).returncode == 0
    out = tmp_path / "killed"
    killed = subprocess.run(
        [sys.executable, "-c", _KILLER, where, "1", json.dumps(_compress(run, out, method))],
        capture_output=True, text=True, cwd=helpers.REPO, timeout=600,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-2000:]
    book = tmp_path / ".killed.partial" / "calibration"
    entries = sorted(p.name for p in book.glob("*/block-*"))
    assert entries == (["block-00000.pkl", "block-00001.pkl"] if where == "boundary" else ["block-00000.pkl"])
    resumed = _cli(_compress(run, out, method))  # the same command resumes
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (out / "model.zlm").read_bytes() == (whole / "model.zlm").read_bytes()
    assert not (tmp_path / ".killed.partial").exists()  # a finished run leaves no journal


def test_a_replayed_walk_visits_nothing_and_a_damaged_entry_is_recomputed(tmp_path, capsys):
    from research import models
    from research.models import config as mc

    cfg = mc.gpt2_style(vocab_size=64, n_layer=3, n_head=2, d_model=16, max_seq_len=16)
    g, p = models.init(cfg, 0)
    inputs = np.random.default_rng(0).integers(0, 64, (4, 16)).astype(np.int32)
    paths = [f"layers/{i}/mlp/up/kernel" for i in range(3)]
    seen, record = [], {}

    def visit(i, stats, n, kernels):
        seen.append(i)
        record[i] = float(stats["mlp/up"].sum())
        return {k: v * 0.5 for k, v in kernels.items()}

    def walk(rec):
        c = calib.Calibration(g, inputs, 2, journal=tmp_path / "j")
        return calib.walk(c, p, paths, visit, stat="sqnorm", desc="test", records=(rec,))

    first = walk(record)
    assert seen == [0, 1, 2]
    again_record: dict = {}
    seen.clear()
    again = walk(again_record)
    assert seen == [] and again_record == record
    for i in range(3):
        a, b = first["layers"][i]["mlp"]["up"]["kernel"], again["layers"][i]["mlp"]["up"]["kernel"]
        assert np.array_equal(np.asarray(a), np.asarray(b))
    entry = tmp_path / "j" / "00-test" / "block-00001.pkl"
    data = bytearray(entry.read_bytes())
    data[-1] ^= 1
    entry.write_bytes(bytes(data))
    walk({})
    assert seen == [1] and "block-00001.pkl is damaged" in capsys.readouterr().err
    # An entry made from other weights (another model at the same path) is not used either.
    seen.clear()
    j = journal.Journal(tmp_path / "j" / "00-test")
    j.put(2, "another key", ({"mlp/up": np.zeros((16, 64), np.float32)}, [{}]))
    walk({})
    assert seen == [2] and "made from other weights" in capsys.readouterr().err
