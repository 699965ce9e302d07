import numpy as np
import pytest

from research import errors
from research.data import corpora, dataset, tokenizers
from tests import helpers


def test_pydoc_corpus_is_embedded():
    c = corpora.load("pydoc")
    assert c.num_bytes > 300_000 and "assert" in c.text
    assert c.sha256 == corpora.load("builtin:pydoc").sha256


def test_missing_corpus_file_is_a_user_error(tmp_path):
    with pytest.raises(errors.UserError, match="does not exist"):
        corpora.load(str(tmp_path / "missing.txt"))


def test_corpus_files_are_read_byte_for_byte(tmp_path):
    (tmp_path / "crlf.txt").write_bytes(b"a\r\nb\rc\n")
    assert corpora.load(str(tmp_path / "crlf.txt")).text.encode() == b"a\r\nb\rc\n"


def test_non_utf8_file_is_a_user_error(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe")
    with pytest.raises(errors.UserError, match="not UTF-8"):
        corpora.load(str(tmp_path / "bad.txt"))


@helpers.needs_shared
def test_wikitext_rows_match_the_hf_split():
    raw = helpers.WIKITEXT_RAW.read_text(encoding="utf-8")
    rows = corpora.wikitext_rows(raw)
    assert len(rows) == 4358
    assert rows[0] == "" and rows[1].startswith(" = Robert Boulter = ") and rows[1].endswith("\n")
    assert corpora.load(f"wikitext:{helpers.WIKITEXT_RAW}").text == "\n\n".join(rows)


def test_split_is_by_characters_first_part_train():
    train, val = dataset.split_text("abcdefghij", 0.1)
    assert (train, val) == ("abcdefghi", "j")
    with pytest.raises(errors.UserError):
        dataset.split_text("abc", 1.0)


def test_prepare_caches_tokens(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("hello world, " * 100)
    tok = tokenizers.ByteTokenizer()
    a = dataset.prepare(str(path), tok, 0.2)
    cached = list((dataset.cache_dir() / "tokens").glob("*.npy"))
    assert cached
    b = dataset.prepare(str(path), tok, 0.2)
    np.testing.assert_array_equal(a.train, b.train)
    assert len(a.train) == 1040 and len(a.val) == 260 and a.train.dtype == np.uint16
    assert a.train_bytes + a.val_bytes == 1300


def test_damaged_cache_entry_is_rebuilt(tmp_path):
    tok = tokenizers.ByteTokenizer()
    text = "some text that gets cached " * 7
    want = dataset.tokenize_cached(text, tok)
    for f in (dataset.cache_dir() / "tokens").glob("*.npy"):
        f.write_bytes(b"garbage")
    np.testing.assert_array_equal(dataset.tokenize_cached(text, tok), want)


def test_batches_are_a_function_of_seed_and_step():
    tokens = np.arange(1000, dtype=np.uint16)
    b = dataset.Batches(tokens, 4, 16, seed=3)
    x, y = b(5)["inputs"], b(5)["targets"]
    assert x.shape == y.shape == (4, 16) and x.dtype == np.int32
    np.testing.assert_array_equal(y, x + 1)  # targets are inputs shifted by one
    np.testing.assert_array_equal(x, dataset.Batches(tokens, 4, 16, seed=3)(5)["inputs"])
    assert not np.array_equal(x, b(6)["inputs"])
    assert not np.array_equal(x, dataset.Batches(tokens, 4, 16, seed=4)(5)["inputs"])


def test_epoch_sampling_visits_every_window_once_per_epoch():
    tokens = np.arange(161, dtype=np.uint16)  # 10 windows of 16
    b = dataset.Batches(tokens, 5, 16, seed=0, sampling="epoch")
    starts = np.concatenate([b(s)["inputs"][:, 0] for s in range(4)])
    assert sorted(starts[:10]) == list(range(0, 160, 16)) == sorted(starts[10:])
    assert not np.array_equal(starts[:10], starts[10:])


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(batch_size=0), "batch size must be positive"),
        (dict(seq_len=100), "fewer than seq_len"),
        (dict(sampling="shuffle"), "sampling"),
    ],
)
def test_bad_batch_settings(kw, match):
    args = dict(tokens=np.arange(50), batch_size=2, seq_len=8, seed=0) | kw
    with pytest.raises(errors.UserError, match=match):
        dataset.Batches(**args)


def test_slice_of_a_corpus(tmp_path):
    (tmp_path / "t.txt").write_text("0123456789")
    assert corpora.load(f"slice:3::{tmp_path / 't.txt'}").text == "3456789"
    assert corpora.load(f"slice::4:file:{tmp_path / 't.txt'}").text == "0123"
    assert corpora.load(f"slice:-3:-1:{tmp_path / 't.txt'}").text == "78"
    t = tmp_path / "t.txt"
    for bad, match in ((f"slice:a::{t}", "integers"), ("slice:1:2:", "names no corpus"), (f"slice:20::{t}", "empty")):
        with pytest.raises(errors.UserError, match=match):
            corpora.load(bad)
