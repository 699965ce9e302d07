"""The model commands end to end: sample, export, and eval on runs and Hugging Face directories."""

import json

import pytest

from research import cli
from research.models import config as mc
from research.models import hf
from tests import helpers
from tests.test_cli import TINY, _bad


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "run"
    assert cli.main(["train", "--workdir", str(path), *TINY]) == 0
    return path


def _out(capsys, args):
    code = cli.main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_sample_is_deterministic_and_continues_the_prompt(run, capsys):
    args = ["sample", "--model", str(run), "--prompt", "def ", "--max-new-tokens", "12", "--temperature", "0"]
    a, b = _out(capsys, args), _out(capsys, args)
    assert a == b and a.startswith("def ") and len(a.encode()) >= 4 + 1
    sampled = _out(capsys, [*args[:-1], "0.9", "--top-k", "5", "--seed", "3"])
    assert sampled.startswith("def ")
    assert _out(capsys, [*args, "--no-cache"]) == a


def test_export_then_eval_gives_the_same_numbers(run, tmp_path, capsys):
    out = _out(capsys, ["export", "--model", str(run), "--out", str(tmp_path / "hf")])
    assert "wrote gpt2 checkpoint" in out and "byte-level tokenizer" in out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "gpt2"
    _bad(["export", "--model", str(run), "--out", str(tmp_path / "hf")], capsys, "--overwrite")
    assert _out(capsys, ["export", "--model", str(run), "--out", str(tmp_path / "hf"), "--overwrite"])

    common = ["--corpus", "pydoc", "--split", "all", "--protocol", "gptq", "--window", "32"]
    _out(capsys, ["eval", "--model", str(run), *common, "--json", str(tmp_path / "run.json")])
    hf_args = ["eval", "--model", str(tmp_path / "hf"), *common]
    text = _out(capsys, [*hf_args, "--json", str(tmp_path / "hf.json")])
    assert "GPTQ/SparseGPT protocol" in text and "exp(mean NLL)" in text
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("run.json", "hf.json"))
    assert a["tokens"] == b["tokens"] > 0
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)


def test_model_commands_reject_bad_input(run, tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    assert cli.main(["export", "--model", str(run), "--out", str(hf_dir)]) == 0
    _bad(["eval", "--model", str(hf_dir)], capsys, "--corpus")
    config = json.loads((hf_dir / "config.json").read_text())
    assert config.pop("ziplm_tokenizer") == "byte"
    (hf_dir / "config.json").write_text(json.dumps(config))
    _bad(["sample", "--model", str(hf_dir)], capsys, "--tokenizer")
    _bad(["eval", "--model", str(run), "--protocol", "gptq", "--stride", "4"], capsys, "--stride")
    _bad(["eval", "--model", str(run), "--window", "64"], capsys, "exceeds the model's context (32)")
    _bad(["sample", "--model", str(hf_dir), "--step", "2"], capsys, "--step applies to run directories")
    _bad(["export", "--model", str(run), "--out", str(tmp_path / "x"), "--model-type", "llama"], capsys, "llama")


@helpers.needs_shared
def test_sample_from_an_hf_directory_with_its_tokenizer(tmp_path, capsys):
    from research import models

    cfg = mc.gpt2_style(vocab_size=50257, n_layer=1, n_head=2, d_model=16, max_seq_len=64)
    info = hf.export(cfg, models.init(cfg)[1], tmp_path / "hf", tokenizer=f"hf:{helpers.GPT2_TOKENIZER}")
    assert {"vocab.json", "merges.txt"} <= set(info["tokenizer_files"])
    args = ["sample", "--model", str(tmp_path / "hf"), "--prompt", "Hello world", "--max-new-tokens", "5"]
    assert _out(capsys, args).startswith("Hello world")


def test_gguf_commands_run_with_torch_unimportable(tmp_path):
    """The commands a user runs on a GGUF model (its tokenizer built from the metadata) with torch made
    unimportable, as in the main install: eval, encode, decode, sample, compress, pack, inspect, export.
    (`test_main_install.py` runs the real model in an environment that has no torch at all.)"""
    import subprocess
    import sys

    from research import models
    from research.data import corpora
    from tests import gguf_files

    text = corpora.pydoc_text()[:60_000]
    vocab = gguf_files.sentencepiece_vocab(text, size=500)
    cfg = mc.llama_style(
        vocab_size=len(vocab["tokens"]), n_layer=1, n_head=2, n_kv_head=1, d_model=32, d_ff=64, max_seq_len=64
    )
    _, params = models.init(cfg, 0)
    model = tmp_path / "m.gguf"
    gguf_files.write_llama(model, cfg, params, vocab=vocab)
    corpus = tmp_path / "text.txt"
    corpus.write_text(text[:6000])
    m, t = str(model), str(tmp_path)
    commands = [
        ["eval", "--model", m, "--corpus", f"file:{corpus}", "--window", "64", "--max-windows", "4"],
        ["encode", "--model", m, str(corpus), f"{t}/c.zlmc", "--context", "64"],
        ["decode", "--model", m, f"{t}/c.zlmc", f"{t}/back.txt"],
        ["sample", "--model", m, "--prompt", "The ", "--max-new-tokens", "5", "--temperature", "0"],
        ["compress", "--model", m, "--workdir", f"{t}/pruned", f"--config.data.corpus=file:{corpus}",
         "--config.calibration.n=0", "--config.eval.max_windows=2", "--config.wandb.mode=disabled"],
        ["pack", "--model", m, "--out", f"{t}/m.zlm"],
        ["inspect", f"{t}/m.zlm"],
        ["export", "--model", f"{t}/m.zlm", "--out", f"{t}/hf"],
    ]  # fmt: skip
    code = (
        "import json, sys\n"
        "sys.modules['torch'] = None  # `import torch` raises; importlib.util.find_spec('torch') is None\n"
        "from research import cli\n"
        f"for args in json.loads({json.dumps(json.dumps(commands))}):\n"
        "    assert cli.main(args) == 0, args\n"
        "    assert not [m for m, v in sys.modules.items() if m.startswith('torch') and v is not None], args\n"
        "print('all ran')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=helpers.REPO, timeout=900)
    assert r.returncode == 0 and "all ran" in r.stdout, r.stderr[-3000:]
    assert (tmp_path / "back.txt").read_text() == corpus.read_text()
    assert (tmp_path / "hf" / "tokenizer.json").is_file()  # the GGUF model's tokenizer goes with the export


def test_a_bf16_checkpoint_evaluates_as_stored_with_float32_numbers(run, tmp_path, capsys):
    """`eval` keeps a bf16 checkpoint's weights bf16 (evaluated a block at a time) and gives the numbers of their
    float32 copies (`--params float32`)."""
    out = tmp_path / "bf16"
    assert cli.main(["export", "--model", str(run), "--out", str(out), "--dtype", "bfloat16"]) == 0
    common = ["eval", "--model", str(out), "--corpus", "pydoc", "--split", "all", "--window", "32"]
    results = {}
    for params in ("checkpoint", "float32"):
        assert cli.main([*common, "--max-windows", "40", "--params", params, "--json", str(tmp_path / params)]) == 0
        results[params] = json.loads((tmp_path / params).read_text())
    capsys.readouterr()
    a, b = results["checkpoint"], results["float32"]
    assert a["tokens"] == b["tokens"] == 40 * 32 and a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    from research import sources

    m = sources.load(str(out), params="checkpoint")
    assert {str(x.dtype) for x in __import__("jax").tree.leaves(m.params)} == {"bfloat16"}
