"""End-to-end: the CLI trains, evaluates and resumes; bad input gets one line on stderr and exit status 2."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from research import cli, models
from research.coding import container
from tests import helpers

TINY = [
    "--config.model.n_layer=1",
    "--config.model.n_head=2",
    "--config.model.d_model=32",
    "--config.model.max_seq_len=32",
    "--config.data.seq_len=32",
    "--config.data.batch_size=4",
    "--config.train.steps=4",
    "--config.train.warmup_steps=1",
    "--config.train.eval_every=2",
    "--config.train.ckpt_every=2",
    "--config.eval.max_windows=8",
    "--config.mesh.data=1",
]


def _run(*args, env=None):
    env = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "research", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=helpers.REPO,
        timeout=300,
    )


def test_train_eval_resume_end_to_end(tmp_path):
    run = tmp_path / "run"
    r = _run("train", "--workdir", str(run), *TINY)
    assert r.returncode == 0, r.stderr
    assert "val bits per byte" in r.stdout and "non-overlapping windows of 32 tokens" in r.stdout
    assert "step 2: train loss 5." in r.stdout  # an evaluation off the logging steps shows its own step's loss
    assert {"config.json", "metrics.jsonl", "summary.json", "checkpoints"} <= {p.name for p in run.iterdir()}

    r = _run("eval", "--workdir", str(run), "--window", "16", "--stride", "8", "--json", str(tmp_path / "e.json"))
    assert r.returncode == 0, r.stderr
    assert "sliding windows of 16 tokens, stride 8" in r.stdout
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["step"] == 4 and result["bits_per_byte"] > 0 and result["tokens"] == 46598

    r = _run("train", "--workdir", str(run), *TINY, "--config.train.steps=6")
    assert r.returncode == 0, r.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"] == 4 and summary["steps"] == 6


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes(tmp_path):
    run = tmp_path / "run"
    args = ["train", "--workdir", str(run), *TINY, "--config.train.steps=100000", "--config.train.ckpt_every=100000"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "research", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=helpers.REPO,
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 5):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM == 143, err  # as a shell reports a SIGTERM
    assert "interrupted: stopped at step" in err and "Traceback" not in err
    stopped = json.loads((run / "summary.json").read_text())["steps"]
    assert stopped >= 5 and (run / "checkpoints" / str(stopped)).is_dir()
    r = _run(
        "train", "--workdir", str(run), *TINY, f"--config.train.steps={stopped + 2}", "--config.train.ckpt_every=100000"
    )
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "summary.json").read_text())["resumed_from"] == stopped


def test_eval_on_fewer_devices_than_training_used(tmp_path):
    from research.train import loop

    cfg = helpers.tiny_config(steps=2)
    cfg.mesh.update(dict(data=2, model=4))  # 8 forced CPU devices in this process, 1 in the subprocess
    loop.train(cfg, tmp_path / "run", progress=False)
    r = _run("eval", "--workdir", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert "bits per byte" in r.stdout


@helpers.needs_shared
def test_demo_writes_table_and_plot(tmp_path, capsys, monkeypatch):
    from research import demo
    from research.models import config as model_config
    from tests import gguf_files

    monkeypatch.setattr(demo, "CODE_BYTES", 4096)  # the coding table on 4 kB of the split keeps the test short
    # The demo ends on a real pretrained model; here a tiny GGUF file with GPT-2's tokenizer stands in for it.
    llm_cfg = model_config.llama_style(vocab_size=50257, n_layer=1, n_head=2, d_model=16, d_ff=32, max_seq_len=128)
    gguf_files.write_llama(tmp_path / "llm.gguf", llm_cfg, models.init(llm_cfg, 0)[1], tokenizer=helpers.GPT2_TOKENIZER)
    monkeypatch.setattr(demo, "LLM", str(tmp_path / "llm.gguf"))
    assert cli.main(["demo", "--workdir", str(tmp_path / "demo"), *TINY]) == 0
    out = capsys.readouterr().out
    assert "ziplm demo" in out and "parameters" in out and "tokens/s" in out
    assert (tmp_path / "demo" / "loss.png").stat().st_size > 1000
    for label in ("dense + 100 steps", "magnitude 50% + 100 steps", "wanda 50% + 100 steps", "codebook 4-bit + 100"):
        assert label in out
    rows = {r[0]: r for r in json.loads((tmp_path / "demo" / "compress_table.json").read_text())["rows"]}
    assert rows["wanda 50%"][1] == pytest.approx(0.5) and rows["dense + 100 steps"][1] == 0.0
    assert "gptq 4-bit g32" in rows and "gptq 4-bit g32 + 0 steps" not in rows
    assert (tmp_path / "demo" / "compress-wanda-50" / "model.zlm").is_file()
    for label, row in rows.items():  # every model's packed size, with its ratio against float32
        assert row[5] > 0 and row[6] > 0, label
    assert (
        rows["gptq 4-bit g32"][6] > 1.5 * rows["dense"][6] and rows["magnitude 50% + 100 steps"][6] > rows["dense"][6]
    )
    w8a8 = container.Reader(tmp_path / "demo" / "compress-w8a8-gptq-act-quant" / "model.zlm").meta
    assert "magnitude 50% -> ft -> gptq 4-bit" in rows  # prune -> fine-tune -> quantize, one model
    assert "w8a8 (gptq + act_quant)" in rows and w8a8["model"]["act_bits"] == 8
    coding = json.loads((tmp_path / "demo" / "coding_table.json").read_text())
    coders = {r["coder"]: r for r in coding["rows"]}
    # One packed file of the dense model: the table's size is the coder's model, byte for byte.
    assert rows["dense"][5] == round(coders["model: dense"]["model_bytes"] / 1e3)
    assert {"gzip -9", "xz -9e", "model: dense", "model: gptq 4-bit g32", f"model: {demo.LLM_LABEL}"} <= set(coders)
    assert coders[f"model: {demo.LLM_LABEL}"]["model_bytes"] == (tmp_path / "llm.gguf").stat().st_size
    for r in coding["rows"]:
        assert r["total_bytes"] == r["model_bytes"] + r["data_bytes"] and r["bits_per_byte"] > 0
    assert (tmp_path / "demo" / "coding.png").stat().st_size > 1000 and "coding the held-out text" in out


def _bad(args, capsys, match):
    code = cli.main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and match in err, err


def test_missing_data_path(tmp_path, capsys):
    _bad(
        ["train", "--workdir", str(tmp_path / "r"), *TINY, f"--config.data.corpus={tmp_path}/none.txt"],
        capsys,
        "none.txt does not exist",
    )
    assert not (tmp_path / "r").exists()


def test_unknown_config_key(tmp_path, capsys):
    _bad(["train", "--workdir", str(tmp_path / "r"), "--config.train.lrr=1"], capsys, "unknown config key")


def test_tokenizer_directory_without_files(tmp_path, capsys):
    (tmp_path / "tok").mkdir()
    _bad(
        ["train", "--workdir", str(tmp_path / "r"), *TINY, f"--config.data.tokenizer={tmp_path}/tok"],
        capsys,
        "has no tokenizer files",
    )
    assert not (tmp_path / "r").exists()


def test_non_positive_batch_size(tmp_path, capsys):
    _bad(
        ["train", "--workdir", str(tmp_path / "r"), *TINY, "--config.data.batch_size=0"],
        capsys,
        "data.batch_size must be a positive integer",
    )


def test_bad_config_file(tmp_path, capsys):
    _bad(["train", "--config", str(tmp_path / "nope.py")], capsys, "does not exist")


def test_eval_of_a_missing_step(tmp_path, capsys):
    assert cli.main(["train", "--workdir", str(tmp_path), *TINY]) == 0
    capsys.readouterr()
    _bad(["eval", "--workdir", str(tmp_path), "--step", "3"], capsys, "available steps: [2, 4]")
    _bad(["eval", "--workdir", str(tmp_path), "--stride", "0"], capsys, "stride")


def test_eval_checks_its_corpus_before_loading_and_takes_a_prefix_of_windows(tmp_path, capsys, monkeypatch):
    assert cli.main(["train", "--workdir", str(tmp_path / "run"), *TINY]) == 0
    capsys.readouterr()
    full, part = tmp_path / "full.json", tmp_path / "part.json"
    assert cli.main(["eval", "--workdir", str(tmp_path / "run"), "--json", str(full)]) == 0
    assert cli.main(["eval", "--workdir", str(tmp_path / "run"), "--max-windows", "3", "--json", str(part)]) == 0
    a, b = json.loads(full.read_text()), json.loads(part.read_text())
    assert b["tokens"] == 3 * 32 < a["tokens"] and b["max_windows"] == 3 and "first 3 windows only" in b["protocol"]
    from research import sources

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(sources, "load", no_load)
    run = str(tmp_path / "run")
    _bad(["eval", "--workdir", run, "--corpus", str(tmp_path / "typo.txt")], capsys, "typo.txt does not exist")
    _bad(["eval", "--workdir", run, "--json", str(tmp_path / "no" / "e.json")], capsys, "directory of")
    _bad(["eval", "--workdir", run, "--max-windows", "0"], capsys, "positive integer")
    _bad(["eval", "--workdir", run, "--lastword", "--max-windows", "2"], capsys, "--lastword-limit")


def test_eval_of_a_directory_that_is_not_a_run(tmp_path, capsys):
    _bad(["eval", "--workdir", str(tmp_path)], capsys, "is neither a run directory")


def test_incompatible_checkpoint_is_refused_and_kept(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--workdir", str(run), *TINY]) == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    _bad(["train", "--workdir", str(run), *TINY, "--config.model.d_model=64"], capsys, "different config")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"]])
def test_help(argv):
    r = _run(*argv)
    assert r.returncode == 0 and "usage: ziplm" in r.stdout
