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


def test_a_crafted_model_header_is_one_line_for_every_reader(run, tmp_path, capsys):
    """Headers with valid checksums that no `pack` writes: the model schema (meta.model, the leaves matching the
    config) refuses them in eval, pack, inspect and export alike, before anything is decoded."""
    from research.coding import container

    good = tmp_path / "good.zlm"
    assert cli.main(["pack", "--model", str(run), "--out", str(good)]) == 0
    capsys.readouterr()
    data = good.read_bytes()

    def crafted(edit):
        h = container.header_of(data)
        edit(h)
        path = tmp_path / "crafted.zlm"
        path.write_bytes(container.with_header(data, h))
        return path

    def huge(h):  # a consistent lie: one leaf claims a shape its config does not have
        h["leaves"][0]["shape"] = [2**20, 2**19]

    cases = {
        "no model": (lambda h: h["meta"].pop("model"), "has no model config"),
        "bad model": (lambda h: h["meta"]["model"].update(n_layer="two"), "model config is invalid"),
        "huge shape": (huge, "do not match its model config"),
        "tokenizer": (lambda h: h["meta"].update(tokenizer=7), "tokenizer is 7"),
    }
    for edit, match in cases.values():
        f = crafted(edit)
        _bad(["inspect", str(f)], capsys, match)
        _bad(["eval", "--model", str(f)], capsys, match)
        _bad(["pack", "--model", str(f), "--out", str(tmp_path / "again.zlm")], capsys, match)
        _bad(["export", "--model", str(f), "--out", str(tmp_path / "hf")], capsys, match)
        assert not (tmp_path / "again.zlm").exists() and not (tmp_path / "hf").exists()
