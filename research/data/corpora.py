"""Text corpora by name.

A corpus spec is a string:
  "pydoc"                         the embedded default: the reference text CPython ships in `pydoc_data.topics`
                                  (about 466 kB of English prose and code, present on every machine, no download).
                                  Its exact bytes depend on the Python version; `Corpus.sha256` records them.
  "<path>" or "file:<path>"       a local UTF-8 text file, read as is (e.g. Tiny Shakespeare's input.txt).
  "wikitext:<path>"               a raw WikiText file (`wiki.test.raw`): rows recovered as in the Hugging Face
                                  `wikitext-2-raw-v1` split and joined with "\\n\\n" (the GPTQ/SparseGPT text).
  "hf:<name>[:<config>]:<split>"  a Hugging Face `datasets` split (needs `pip install datasets` and a network);
                                  the "text" column's rows are joined with "\\n\\n".
  "slice:<start>:<end>:<spec>"    characters start..end of another spec's text (either bound may be empty), e.g.
                                  "slice:300000::wikitext:wiki.test.raw": calibration text disjoint from the
                                  windows an evaluation takes from the start of the same file.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from research import errors


@dataclasses.dataclass(frozen=True)
class Corpus:
    name: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    @property
    def num_bytes(self) -> int:
        return len(self.text.encode("utf-8"))


def pydoc_text() -> str:
    """The embedded default corpus: pydoc's topic texts in sorted key order, separated by blank lines."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def wikitext_rows(raw: str) -> list[str]:
    """Rows of a raw WikiText file as the Hugging Face split has them (blank lines become empty rows)."""
    return [line + "\n" if line.strip() else "" for line in raw.split("\n")[:-1]]


def _read(path: str) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise errors.UserError(f"corpus file {p} does not exist (pass a text file path, or 'pydoc' for the default)")
    try:
        return p.read_bytes().decode("utf-8")  # bytes as they are: no newline translation
    except UnicodeDecodeError as e:
        raise errors.UserError(f"corpus file {p} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _hf(spec: str) -> str:
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise errors.UserError(f"hf corpus spec must be 'hf:<name>[:<config>]:<split>', got 'hf:{spec}'")
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    try:
        import datasets
    except ImportError:
        raise errors.UserError("hf: corpora need the `datasets` package: pip install datasets") from None
    try:
        rows = datasets.load_dataset(name, config, split=split)["text"]
    except Exception as e:  # network, unknown name: datasets raises many types
        raise errors.UserError(f"cannot load dataset {name}/{config}:{split}: {type(e).__name__}: {e}") from None
    return "\n\n".join(rows)


def load(spec: str) -> Corpus:
    """Loads the corpus a spec names (see the module docstring)."""
    if spec in ("pydoc", "builtin:pydoc"):
        return Corpus("pydoc", pydoc_text())
    if spec.startswith("slice:"):
        start, end, inner = (spec[6:].split(":", 2) + ["", ""])[:3]
        try:
            lo, hi = (int(start) if start else None), (int(end) if end else None)
        except ValueError:
            raise errors.UserError(
                f"corpus {spec!r}: slice bounds must be integers (slice:<start>:<end>:<spec>)"
            ) from None
        if not inner:
            raise errors.UserError(f"corpus {spec!r} names no corpus after the bounds (slice:<start>:<end>:<spec>)")
        text = load(inner).text[lo:hi]
        if not text:
            raise errors.UserError(f"corpus {spec!r} is empty: the slice lies outside the text")
        return Corpus(spec, text)
    if spec.startswith("hf:"):
        return Corpus(spec, _hf(spec[3:]))
    if spec.startswith("wikitext:"):
        return Corpus(spec, "\n\n".join(wikitext_rows(_read(spec[9:]))))
    return Corpus(spec, _read(spec.removeprefix("file:")))
