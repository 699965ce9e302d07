import json

import numpy as np
import pytest

from research import errors, log
from research.train import checkpoint, loop
from tests import helpers


def _train_losses(workdir):
    return {r["step"]: r["loss"] for r in log.read_jsonl(workdir / "metrics.jsonl") if r["split"] == "train"}


@pytest.mark.parametrize("stop_at", [4, 6], ids=["at-checkpoint", "between-checkpoints"])
def test_resumed_run_continues_the_same_trajectory(tmp_path, stop_at):
    cfg = helpers.tiny_config(steps=10)
    cfg.model.dropout = 0.1  # dropout keys must also continue
    full = loop.train(cfg, tmp_path / "full", progress=False)

    with pytest.raises(loop.Interrupted):
        loop.train(cfg, tmp_path / "resumed", stop_at=stop_at, progress=False)
    assert checkpoint.Checkpoints(tmp_path / "resumed").all_steps()[-1] == stop_at
    resumed = loop.train(cfg, tmp_path / "resumed", progress=False)

    assert resumed["resumed_from"] == stop_at
    assert _train_losses(tmp_path / "resumed") == _train_losses(tmp_path / "full")  # bit-identical
    assert resumed["val"]["loss"] == full["val"]["loss"]
    _, _, a, _ = checkpoint.load_run(tmp_path / "full")
    _, _, b, meta = checkpoint.load_run(tmp_path / "resumed")
    np.testing.assert_array_equal(a["layers"][1]["mlp"]["down"]["kernel"], b["layers"][1]["mlp"]["down"]["kernel"])
    assert meta["step"] == 10 and meta["data"]["next_step"] == 10


def test_metrics_beyond_the_checkpoint_are_dropped_on_resume(tmp_path):
    cfg = helpers.tiny_config(steps=8)
    with pytest.raises(loop.Interrupted):
        loop.train(cfg, tmp_path / "r", stop_at=6, progress=False)
    # Simulate a crash after step 6's log line but before any checkpoint past 4.
    ckpts = checkpoint.Checkpoints(tmp_path / "r")
    assert ckpts.all_steps() == [4, 6]
    ckpts.delete(6)
    loop.train(cfg, tmp_path / "r", progress=False)
    steps = [r["step"] for r in log.read_jsonl(tmp_path / "r" / "metrics.jsonl") if r["split"] == "train"]
    assert steps == list(range(1, 9))


def test_incompatible_run_directory_is_refused_untouched(tmp_path):
    run = tmp_path / "run"
    loop.train(helpers.tiny_config(steps=4), run, progress=False)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    cfg = helpers.tiny_config(steps=4)
    cfg.model.d_model = 64
    with pytest.raises(errors.UserError, match="different config.*model.d_model: 32 -> 64"):
        loop.train(cfg, run, progress=False)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_foreign_directory_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(errors.UserError, match="not a ziplm run directory"):
        loop.train(helpers.tiny_config(), tmp_path, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_extending_a_finished_run(tmp_path):
    cfg = helpers.tiny_config(steps=4)
    loop.train(cfg, tmp_path, progress=False)
    cfg.train.steps = 6  # allowed: more steps (a different schedule, so not the same trajectory)
    s = loop.train(cfg, tmp_path, progress=False)
    assert s["resumed_from"] == 4 and s["steps"] == 6
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 6


def test_checkpoint_shape_mismatch_is_a_user_error(tmp_path):
    loop.train(helpers.tiny_config(steps=4), tmp_path, progress=False)
    saved = json.loads((tmp_path / "config.json").read_text())
    ckpts = checkpoint.Checkpoints(tmp_path)
    meta = ckpts.meta()
    meta["config"]["model"]["d_ff"] = 64  # a meta record that disagrees with the stored arrays
    meta["meta_sha256"] = checkpoint._meta_digest(meta)  # written consistently (not damage): its hashes agree
    (tmp_path / "checkpoints" / "4" / "meta" / "metadata").write_text(json.dumps(meta))
    (tmp_path / "checkpoints" / "4" / checkpoint.FILE_MANIFEST).unlink()
    assert saved["model"]["d_ff"] is None
    with pytest.raises(
        errors.UserError,
        match=r"incompatible config: .*mlp/down/kernel has shape \(128, 32\) "
        r"there, but the config gives \(64, 32\)",
    ):
        checkpoint.load_run(tmp_path)


def test_directory_left_by_a_crash_before_any_checkpoint_starts_afresh(tmp_path):
    (tmp_path / "a" / "checkpoints").mkdir(parents=True)  # crash while creating the checkpoint manager
    loop.train(helpers.tiny_config(steps=2), tmp_path / "a", progress=False)
    cfg = helpers.tiny_config(steps=2)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps({"seed": 7}))  # a start that never checkpointed
    assert loop.train(cfg, tmp_path / "b", progress=False)["resumed_from"] is None


def test_resume_refuses_a_changed_corpus(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    cfg = helpers.tiny_config(steps=6)
    cfg.data.corpus = str(corpus)
    with pytest.raises(loop.Interrupted):
        loop.train(cfg, tmp_path / "run", stop_at=4, progress=False)
    corpus.write_text("a different text entirely, of about the same size. " * 40)
    with pytest.raises(errors.UserError, match="changed since"):
        loop.train(cfg, tmp_path / "run", progress=False)
