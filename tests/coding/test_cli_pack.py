"""`ziplm pack / inspect` end to end, and their bad input (one line, exit 2, nothing written)."""

import json

import pytest

from research import cli
from tests.test_cli import TINY, _bad


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("packcli") / "run"
    assert cli.main(["train", "--workdir", str(path), *TINY]) == 0
    return path


def _loss(capsys, tmp_path, model):
    out = tmp_path / "e.json"
    assert cli.main(["eval", "--model", str(model), "--json", str(out)]) == 0
    capsys.readouterr()
    return json.loads(out.read_text())["loss"]


def test_pack_inspect_round_trip(run, tmp_path, capsys):
    f = tmp_path / "run.zlm"
    assert cli.main(["pack", "--model", str(run), "--out", str(f), "--json", str(tmp_path / "r.json")]) == 0
    text = capsys.readouterr().out
    assert "bits per weight" in text and "vs float32" in text
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["file_bytes"] == f.stat().st_size and rep["kinds"]["float"]["leaves"] > 0
    assert cli.main(["inspect", str(f), "--leaves"]) == 0
    text = capsys.readouterr().out
    assert "layers/0/attn/q/kernel" in text and "checksums verified" in text
    dense = _loss(capsys, tmp_path, run)
    assert _loss(capsys, tmp_path, f) == dense  # a packed file evaluates like its source, on the same split


def test_bad_input_is_one_line(run, tmp_path, capsys):
    f = tmp_path / "m.zlm"
    assert cli.main(["pack", "--model", str(run), "--out", str(f)]) == 0
    capsys.readouterr()
    _bad(["pack", "--model", str(run), "--out", str(f)], capsys, "exists; pass --overwrite")
    _bad(["inspect", str(tmp_path / "nope.zlm")], capsys, "does not exist")
    not_packed = tmp_path / "x.zlm"
    not_packed.write_bytes(b"hello world, not a model at all, but long enough for the header" * 2)
    _bad(["inspect", str(not_packed)], capsys, "not a ziplm packed model")
    damaged = bytearray(f.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    (tmp_path / "d.zlm").write_bytes(bytes(damaged))
    _bad(["pack", "--model", str(tmp_path / "d.zlm"), "--out", str(tmp_path / "u2.zlm")], capsys, "fails its checksum")
    assert not (tmp_path / "u2.zlm").exists()
    _bad(["eval", "--model", str(tmp_path / "d.zlm")], capsys, "fails its checksum")
