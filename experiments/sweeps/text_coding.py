"""Held-out text coded with the Tiny Shakespeare model, dense and compressed (experiments/sweeps/text_models.py),
by arithmetic coding of its next-token probabilities; every coded file decoded and compared with the input.
Models x data sets: the Tiny Shakespeare validation split (the last 10% of characters, never trained on) and the
first 262,144 bytes of WikiText-2 raw test (out of domain). ~10 min on 2 CPU cores.

    ziplm sweep experiments/sweeps/text_models.py && ziplm sweep experiments/sweeps/text_coding.py
    python experiments/text_compression.py     # both sweeps, then gzip / bz2 / xz / zstd and the description lengths

The data files are written under runs/sweeps/text_data/ when missing (the validation split's bytes, the WikiText
prefix). Coding: chunks of the model's context (64 bytes), 64 parallel streams.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments.sweeps import study, text_models  # noqa: E402
from research import files  # noqa: E402
from research.data import corpora, dataset  # noqa: E402

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
WIKITEXT_RAW = ROOT.parent / "shared" / "data" / "wikitext-2" / "raw" / "wiki.test.raw"
WIKITEXT_BYTES = 262_144
DATA = ROOT / "runs" / "sweeps" / "text_data"


def data_files() -> list[dict]:
    """The data sets as files (written once): [{"label", "input"}]."""
    out = []
    val = DATA / "tinyshakespeare_val.txt"
    if not val.exists() and SHAKESPEARE.exists():
        files.write_bytes(val, dataset.split_text(SHAKESPEARE.read_text(), 0.1)[1].encode())
    if val.exists():
        out.append({"label": "shakespeare_val", "input": str(val)})
    wiki = DATA / f"wikitext2_test_{WIKITEXT_BYTES}.txt"
    if not wiki.exists() and WIKITEXT_RAW.exists():
        files.write_bytes(wiki, corpora.load(f"wikitext:{WIKITEXT_RAW}").text.encode()[:WIKITEXT_BYTES])
    if wiki.exists():
        out.append({"label": "wikitext2_test", "input": str(wiki)})
    return out


def models() -> list[dict]:
    compressed = Path(text_models.get_config()["workdir"])
    return [{"label": "dense", "model": str(study.model())}] + [
        {"label": p["label"], "model": str(compressed / p["label"] / "model.zlm")} for p in text_models.POINTS
    ]


def get_config():
    DATA.mkdir(parents=True, exist_ok=True)
    return dict(
        name="text_coding",
        job="encode",
        workdir=str(ROOT / "runs" / "sweeps" / "text_coding"),
        base=dict(model=None, input=None, batch_size=64),
        axes=[data_files(), models()],
        wandb=dict(mode="disabled"),
    )
