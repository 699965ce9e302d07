"""The tokenizer a GGUF file's metadata describes, built with the `tokenizers` package alone (no torch).

    tok = gguf_tokenizer.build("SmolLM2-135M-Instruct.Q4_1.gguf")   # a transformers PreTrainedTokenizerFast
    tokenizers.load("gguf:SmolLM2-135M-Instruct.Q4_1.gguf")           # the same, built once and cached

A GGUF file carries no `tokenizer.json`: llama.cpp's converter stores the vocabulary as `tokenizer.ggml.*` metadata
(read here with the `gguf` package). The two families it writes for the models ziplm loads are rebuilt:

    tokenizer.ggml.model  what it is                    built as
    gpt2                  byte-level BPE (GPT-2, Llama  BPE over GPT-2's byte alphabet with the file's merges;
                          3, Qwen2, SmolLM, ...)        the pre-tokenizer of `tokenizer.ggml.pre` (table below)
    llama                 SentencePiece BPE with byte   BPE with byte fallback (`<0xNN>` tokens); merges from the
                          fallback (Llama 2, Mistral)   file, else derived from the scores, best first; "▁" for
                                                        spaces, prefixed once when `add_space_prefix` (default)

Control tokens (token type 3) become special added tokens and user-defined ones (4) plain added tokens, so both
stay whole in text; BOS / EOS / UNK / PAD come from their ids and `add_bos_token` / `add_eos_token` from the file
(a SentencePiece file without the flag adds BOS, as llama.cpp does).

Pre-tokenizers follow llama.cpp's table for `tokenizer.ggml.pre` (the split the vocabulary was trained with):
GPT-2's regex by default; Llama 3's and Qwen2's regexes for their families; single digits first for the StarCoder
family (`smollm`, `starcoder`, `refact`, ...), as SmolLM's own `tokenizer.json` does (`Digits` then `ByteLevel`).
An unknown name falls back to GPT-2's regex with a warning (tokenization still round-trips every string; only how
well the model predicts the tokens can suffer).

Differences from `transformers`' GGUF conversion (which needs torch to read the file): the same ids for every
pre-tokenizer it knows (tested on WikiText-2 and hostile strings), but `transformers` 5.25 has no entry for the
StarCoder family and splits those files with GPT-2's regex, so whitespace runs before digits differ (`"a  1"`:
`["ĠĠ", "1"]` here and in SmolLM's `tokenizer.json`, `["Ġ", "Ġ", "1"]` there); and it ignores a SentencePiece
file's `add_space_prefix = false`.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from research import errors

# llama.cpp's pre-tokenizer table (src/llama-vocab.cpp), by family: the splits applied before byte-level BPE, each
# piece of one split by the next (pieces kept, "isolated"). GPT2 stands for the `ByteLevel` pre-tokenizer's own regex
# (GPT-2's), which ends every list it is in; DIGITS for one piece per digit (`Digits`, as SmolLM's and StarCoder's
# tokenizer.json have it; llama.cpp splits on \p{N}).
GPT2, DIGITS = "gpt2", "digits"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
SPLITS = {
    **dict.fromkeys(("default", "gpt-2", "gpt2", "mpt", "olmo", "jais"), (GPT2,)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"), (_LLAMA3,)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"), (_QWEN2,)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"), (DIGITS, GPT2)),
}
FAMILIES = ("gpt2", "llama")  # tokenizer.ggml.model values this module builds
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types


def metadata(path) -> dict:
    """{short name: value} of the file's `tokenizer.ggml.*` fields (and `general.architecture`)."""
    import gguf as gguf_lib

    path = Path(path).expanduser()
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise errors.UserError(f"cannot read GGUF file {path}: {e.strerror or e}") from None
    if magic != b"GGUF":
        raise errors.UserError(f"{path} is not a GGUF file (no GGUF magic at its start)")
    try:
        reader = gguf_lib.GGUFReader(str(path))
        out = {
            key.removeprefix("tokenizer.ggml.").removeprefix("tokenizer."): field.contents()
            for key, field in reader.fields.items()
            if key.startswith("tokenizer.")
        }
        out["architecture"] = (
            reader.fields["general.architecture"].contents() if "general.architecture" in reader.fields else None
        )
    except Exception as e:  # truncated or damaged: the reader raises ValueError, IndexError, struct errors...
        raise errors.UserError(f"cannot read GGUF file {path}: {type(e).__name__}: {str(e)[:200]}") from None
    return out


@functools.lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte value (byte-level BPE's spelling of bytes)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in kept:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _byte_level(meta: dict, where: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    spell = byte_alphabet()
    alphabet = set(spell.values())
    # A token written with characters outside the byte alphabet is respelled from its UTF-8 bytes.
    tokens = [t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8")) for t in meta["tokens"]]
    vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}  # the first id wins a duplicated spelling
    merges = checked_merges(meta.get("merges") or (), vocab, where)
    backend = Tokenizer(
        models.BPE(vocab, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    )
    pre = meta.get("pre") or "default"
    splits = SPLITS.get(pre)
    if splits is None:
        print(
            f"warning: {where.name}: pre-tokenizer {pre!r} is not one ziplm knows; splitting with GPT-2's regex"
            f" (known: {', '.join(sorted(SPLITS))})",
            file=sys.stderr,
        )
        splits = (GPT2,)
    steps = [
        pre_tokenizers.Digits(individual_digits=True) if r == DIGITS else pre_tokenizers.Split(Regex(r), "isolated")
        for r in splits
        if r != GPT2
    ]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=splits[-1] == GPT2))
    backend.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    return backend, tokens, alphabet


def _sentencepiece(meta: dict, where: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens = list(meta["tokens"])
    vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}
    if meta.get("merges"):
        merges = checked_merges(meta["merges"], vocab, where)
    else:
        merges = derived_merges(tokens, meta.get("scores"))
    backend = Tokenizer(models.BPE(vocab, merges, fuse_unk=True, byte_fallback=True, dropout=None))
    prefix = bool(meta.get("add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1, right=0)] if prefix else []))
    return backend, tokens


def checked_merges(merges, vocab: dict, where: Path) -> list[tuple[str, str]]:
    """The file's merges ("left right") as pairs, each checked to join two tokens into a third (the tokenizers
    package panics on a merge outside the vocabulary)."""
    out = []
    for m in merges:
        pair = tuple(m.split(" ", 1))
        if len(pair) != 2 or pair[0] not in vocab or pair[1] not in vocab or pair[0] + pair[1] not in vocab:
            raise errors.UserError(f"{where}: merge {m!r} does not join two tokens of the vocabulary into a third")
        out.append(pair)
    return out


def derived_merges(tokens: list[str], scores) -> list[tuple[str, str]]:
    """The merges a SentencePiece vocabulary implies: every split of a token into two tokens, ranked by the merged
    token's score (best first; ties: shorter left piece, then shorter right piece; then by the pieces' ids)."""
    vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}
    scores = list(scores) if scores is not None else [-float(i) for i in range(len(tokens))]
    found = []
    for token, score in zip(tokens, scores):
        pairs = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        found += [(left, right, float(score)) for left, right in pairs]
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def build(path):
    """The file's tokenizer as a `transformers.PreTrainedTokenizerFast` (see the module docstring).

    Raises:
      UserError: not a GGUF file, no tokenizer in it, or a family other than gpt2 / llama.
    """
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    path = Path(path).expanduser()
    meta = metadata(path)
    family = meta.get("model")
    if family in (None, "none", "no_vocab") or not meta.get("tokens"):
        raise errors.UserError(f"{path} holds no tokenizer (tokenizer.ggml.model is {family!r})")
    if family not in FAMILIES:
        raise errors.UserError(
            f"{path}: tokenizer family {family!r} is not supported (ziplm builds {', '.join(FAMILIES)}); pass a"
            " Hugging Face tokenizer directory with --tokenizer instead"
        )
    types = list(meta.get("token_type") or [])
    if len(types) not in (0, len(meta["tokens"])):
        raise errors.UserError(f"{path}: {len(types)} token types for {len(meta['tokens'])} tokens (damaged metadata)")
    if family == "gpt2":
        backend, tokens, alphabet = _byte_level(meta, path)
    else:
        (backend, tokens), alphabet = _sentencepiece(meta, path), None
    # Control tokens spelled outside the byte alphabet are mislabelled by the converter; adding them would grow the
    # vocabulary past the model's (transformers skips them too).
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, k in zip(meta["tokens"], types)
        if k == _CONTROL and (alphabet is None or set(t) <= alphabet)
    ]
    backend.add_special_tokens(control)
    vocab = backend.get_vocab()
    backend.add_tokens(
        [
            AddedToken(t, normalized=False, special=False)
            for t, k in zip(meta["tokens"], types)
            if k == _USER_DEFINED and t in vocab
        ]
    )

    def named(key):
        i = meta.get(f"{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    add_bos = meta.get("add_bos_token", family == "llama")
    kwargs = dict(
        bos_token=named("bos"),
        eos_token=named("eos"),
        unk_token=named("unknown"),
        pad_token=named("padding"),
        add_bos_token=bool(add_bos),
        add_eos_token=bool(meta.get("add_eos_token", False)),
    )
    if meta.get("chat_template"):
        kwargs["chat_template"] = meta["chat_template"]
    try:
        return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **kwargs)
    except Exception as e:  # a vocabulary the tokenizers package rejects (merges of unknown tokens, ...)
        raise errors.UserError(f"cannot build the tokenizer of {path}: {type(e).__name__}: {str(e)[:200]}") from None
