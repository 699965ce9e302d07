import json
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from research import errors
from research.data import tokenizers
from tests import helpers


@given(st.binary(max_size=200))
@settings(max_examples=50, deadline=None)
def test_byte_tokenizer_is_lossless(data):
    tok = tokenizers.ByteTokenizer()
    ids = tok.encode(data)
    assert ids.tolist() == list(data)
    assert bytes(np.asarray(ids, np.uint8).tolist()) == data


def test_byte_tokenizer_text_roundtrip():
    tok = tokenizers.load("byte")
    text = "héllo, wörld ✓"
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) == len(text.encode("utf-8"))


@helpers.needs_shared
def test_gpt2_tokenizer_offline():
    tok = tokenizers.load(str(helpers.GPT2_TOKENIZER))
    assert tok.vocab_size == 50257
    assert tok.encode("Hello world").tolist() == [15496, 995]
    assert tok.decode([15496, 995]) == "Hello world"
    assert tok.fingerprint == tokenizers.load("hf:" + str(helpers.GPT2_TOKENIZER)).fingerprint


@helpers.needs_shared
def test_gpt2_tokenizer_reproduces_all_test_vectors():
    tok = tokenizers.load(str(helpers.GPT2_TOKENIZER))
    folder = helpers.GPT2_TOKENIZER / "testvectors"
    inputs = (folder / "ggml-vocab-gpt-2.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = (folder / "ggml-vocab-gpt-2.gguf.out").read_text(encoding="utf-8").split("\n")
    assert len(inputs) == len(outputs) == 47  # both files end with a separator: the last vector is "" -> []
    for text, want in zip(inputs, outputs):
        assert tok.encode(text).tolist() == [int(i) for i in want.split()], repr(text)


@helpers.needs_shared
def test_token_bytes_sum_to_utf8_length():
    tok = tokenizers.load(str(helpers.GPT2_TOKENIZER))
    text = "Naïve café — 東京 😀 tokens\n\n  spaced"
    ids = tok.encode(text)
    assert tok.token_bytes[ids].sum() == len(text.encode("utf-8"))
    literal = "a<|endoftext|>b"  # a special token written in the text stands for its 13 bytes
    assert tok.token_bytes[tok.encode(literal)].sum() == len(literal)
    assert tok.decode(tok.encode(literal)) == literal


def test_token_bytes_of_a_sentencepiece_style_vocabulary(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    for piece in ("▁", "a", "b", "▁a", "ab", "▁ab"):
        vocab[piece] = len(vocab)
    backend = Tokenizer(models.BPE(vocab, [("▁", "a"), ("a", "b"), ("▁a", "b")], byte_fallback=True, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(tmp_path)
    tok = tokenizers.load(str(tmp_path))
    text = "ab a ☃ bab"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.token_bytes[vocab["<0xE2>"]] == 1 and tok.token_bytes[vocab["▁ab"]] == 3
    assert tok.token_bytes[ids].sum() == len(text.encode("utf-8"))


def test_directory_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(errors.UserError, match="has no tokenizer files"):
        tokenizers.load(str(tmp_path))


def test_missing_tokenizer_directory(tmp_path):
    with pytest.raises(errors.UserError, match="does not exist"):
        tokenizers.load(str(tmp_path / "nope"))


@helpers.needs_shared
def test_added_prefix_is_what_the_tokenizer_puts_first(tmp_path):
    assert tokenizers.load("byte").added_prefix.tolist() == []
    assert tokenizers.load(str(helpers.GPT2_TOKENIZER)).added_prefix.tolist() == []  # GPT-2 adds nothing
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(helpers.GPT2_TOKENIZER / name, tmp_path / name)
    config = {"add_bos_token": True, "bos_token": "<|endoftext|>", "tokenizer_class": "GPT2Tokenizer"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = tokenizers.load(str(tmp_path))
    assert tok.added_prefix.tolist() == [50256]  # as OPT's and Llama's tokenizers add BOS
    assert tok.encode("Hello world").tolist() == [15496, 995]  # encode itself never adds it
