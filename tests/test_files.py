"""The atomic output helpers, and one-line errors for bad arguments and outputs (issue: reliability)."""

import os

import pytest

from research import cli, errors, files


def test_atomic_file_refuses_a_target_that_appeared_meanwhile(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(errors.UserError, match="appeared while it was being written"):
        with files.atomic_file(target, overwrite=False) as f:
            f.write(b"new")
            target.write_bytes(b"someone else's")
    assert target.read_bytes() == b"someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]  # no temporary left


def test_atomic_file_failure_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"good")
    with pytest.raises(RuntimeError):
        with files.atomic_file(target) as f:
            f.write(b"half")
            raise RuntimeError("crash")
    assert target.read_bytes() == b"good" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_a_dangling_symlink_is_not_written_through(tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(errors.UserError, match="exists"):
        files.write_bytes(link, b"x", overwrite=False)
    assert not (tmp_path / "elsewhere").exists()
    with pytest.raises(errors.UserError, match="dangling symlink"):
        files.AtomicDir(link)


def test_outputs_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = files.write_bytes(tmp_path / "f", b"x")
        with files.AtomicDir(tmp_path / "d") as d:
            (d / "inner").write_text("y")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_atomic_dir_refuses_a_target_that_appeared_meanwhile(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(errors.UserError, match="appeared while it was being written"):
        with files.AtomicDir(target) as tmp:
            (tmp / "mine").write_text("1")
            target.mkdir()
            (target / "theirs").write_text("2")
    assert [p.name for p in target.iterdir()] == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_overwrite_replaces_only_when_complete(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("1")
    with pytest.raises(RuntimeError):
        with files.AtomicDir(target, overwrite=True) as tmp:
            (tmp / "new").write_text("2")
            raise RuntimeError
    assert [p.name for p in target.iterdir()] == ["old"]
    with files.AtomicDir(target, overwrite=True) as tmp:
        (tmp / "new").write_text("2")
    assert [p.name for p in target.iterdir()] == ["new"]


def test_os_errors_are_one_line(tmp_path):
    (tmp_path / "adir").mkdir()
    with pytest.raises(errors.UserError, match="is a directory"):
        files.write_bytes(tmp_path / "adir", b"x")
    with pytest.raises(errors.UserError, match="does not exist"):
        files.write_bytes(tmp_path / "missing" / "f", b"x")
    e = files.os_error(OSError(28, "No space left on device"), "writing /x/model.zlm")
    assert str(e) == "no space left on device writing /x/model.zlm"


def _bad(args, capsys, match):
    code = cli.main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and match in err, err


@pytest.mark.parametrize(
    "args, match",
    [
        (["encode", "--model", "m", "in", "out", "--chunk-len", "0"], "--chunk-len: must be a positive integer"),
        (["encode", "--model", "m", "in", "out", "--batch-size", "-1"], "--batch-size: must be a positive"),
        (["sample", "--model", "m", "--max-new-tokens", "-1"], "--max-new-tokens"),
        (["sample", "--model", "m", "--temperature", "nan"], "--temperature: must be a finite number"),
        (["sample", "--model", "m", "--seed", "-3"], "--seed"),
        (["eval", "--model", "m", "--step", "-1"], "--step"),
    ],
)
def test_bad_arguments_are_one_line_errors(capsys, args, match):
    _bad(args, capsys, match)


def test_outputs_are_checked_before_any_work(tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("hello")
    # The model does not exist either: the output checks come first, so no model is loaded and nothing written.
    _bad(["encode", "--model", str(tmp_path / "none"), str(src), str(tmp_path / "x" / "out")], capsys, "does not exist")
    _bad(
        ["encode", "--model", "none", str(src), str(tmp_path / "o"), "--json", str(tmp_path / "no" / "r.json")],
        capsys,
        "the directory of",
    )
    (tmp_path / "o").write_text("keep")
    _bad(["encode", "--model", "none", str(src), str(tmp_path / "o")], capsys, "pass --overwrite")
    assert (tmp_path / "o").read_text() == "keep"


def test_config_files_that_fail_are_one_line_errors(tmp_path, capsys):
    cases = {
        "syntax.py": ("def get_config(:\n", "syntax error at line 1"),
        "raises.py": ("def get_config():\n    raise KeyError('boom')\n", "get_config() in"),
        "alist.py": ("def get_config():\n    return [1, 2]\n", "returned a list"),
    }
    for name, (text, match) in cases.items():
        (tmp_path / name).write_text(text)
        _bad(["train", "--config", str(tmp_path / name), "--workdir", str(tmp_path / "r")], capsys, match)
    assert not (tmp_path / "r").exists()
