"""Checkpoint integrity, run-directory locking, divergence and damaged metadata (issue: reliability)."""

import json

import numpy as np
import pytest

from research import errors, files, log
from research.train import checkpoint, loop
from tests import helpers


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 8-step run with checkpoints at steps 4 and 8 (copied per test before damaging it)."""
    run = tmp_path_factory.mktemp("integrity") / "run"
    loop.train(helpers.tiny_config(steps=8), run, progress=False)
    return run


def _copy(run, tmp_path):
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _largest_state_file(run, step):
    data = [p for p in (run / "checkpoints" / str(step) / "state").rglob("*") if p.is_file()]
    return max(data, key=lambda p: p.stat().st_size)


def _flip(path, offset, bit=0):
    raw = bytearray(path.read_bytes())
    raw[offset % len(raw)] ^= 1 << bit
    path.write_bytes(bytes(raw))


def test_checksums_are_mesh_independent_and_see_one_bit():
    import jax.numpy as jnp

    a = {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4), "b": jnp.ones(5, jnp.bfloat16), "s": jnp.int32(3)}
    base = checkpoint.checksums(a)
    flipped = np.asarray(a["w"]).copy()
    flipped.view(np.uint32)[1, 2] ^= 1 << 31
    other = checkpoint.checksums({**a, "w": jnp.asarray(flipped)})
    assert other["w"][0] != base["w"][0] and other["w"][1] != base["w"][1]
    assert other["b"] == base["b"] and other["s"] == base["s"]
    swapped = checkpoint.checksums({**a, "w": a["w"][::-1]})  # same words, other places: the weighted sum differs
    assert swapped["w"][0] == base["w"][0] and swapped["w"][1] != base["w"][1]


@pytest.mark.parametrize("offset", [0, 997, 12_345, -40, -3])
def test_a_flipped_bit_in_the_newest_step_falls_back_to_the_intact_one(finished, tmp_path, capsys, offset):
    run = _copy(finished, tmp_path)
    _flip(_largest_state_file(run, 8), offset, bit=offset % 8)
    _, _, params, meta = checkpoint.load_run(run)
    assert meta["step"] == 4
    assert "step 8" in capsys.readouterr().err
    _, _, intact, _ = checkpoint.load_run(finished, step=4)
    np.testing.assert_array_equal(params["embed"]["embedding"], intact["embed"]["embedding"])
    with pytest.raises(errors.CorruptData, match="step 8 .* damaged"):
        checkpoint.load_run(run, step=8)


def test_a_damaged_meta_record_is_named(finished, tmp_path):
    run = _copy(finished, tmp_path)
    meta = next((run / "checkpoints" / "8" / "meta").rglob("*.json*"), None) or next(
        p for p in (run / "checkpoints" / "8" / "meta").rglob("*") if p.is_file()
    )
    text = meta.read_text()
    meta.write_text(text.replace('"next_step": 8', '"next_step": 9'))  # valid JSON, different content
    with pytest.raises(errors.CorruptData, match="step 8 .*SHA-256"):
        checkpoint.load_run(run, step=8)
    meta.write_text("{not json")
    assert checkpoint.load_run(run)[3]["step"] == 4


def test_every_step_damaged_is_one_error(finished, tmp_path):
    run = _copy(finished, tmp_path)
    for step in (4, 8):
        _flip(_largest_state_file(run, step), 5000, bit=6)
    with pytest.raises(errors.CorruptData, match="every checkpoint .* damaged"):
        checkpoint.load_run(run)


def test_resume_after_damage_recomputes_the_same_trajectory(finished, tmp_path):
    run = _copy(finished, tmp_path)
    reference = json.loads((finished / "summary.json").read_text())
    _flip(_largest_state_file(run, 8), 4321, bit=3)
    resumed = loop.train(helpers.tiny_config(steps=8), run, progress=False)  # the damaged step 8 is recomputed
    assert resumed["resumed_from"] == 4 and resumed["steps"] == 8
    assert resumed["val"]["loss"] == reference["val"]["loss"]
    _, _, a, _ = checkpoint.load_run(finished)
    _, _, b, meta = checkpoint.load_run(run)
    assert meta["step"] == 8
    np.testing.assert_array_equal(a["layers"][1]["mlp"]["down"]["kernel"], b["layers"][1]["mlp"]["down"]["kernel"])


def test_a_second_writer_is_refused(tmp_path):
    run = tmp_path / "run"
    with files.RunLock(run):
        with pytest.raises(errors.UserError, match=r"in use by pid \d+"):
            loop.train(helpers.tiny_config(steps=2), run, progress=False)
    assert not (run / "config.json").exists()
    loop.train(helpers.tiny_config(steps=2), run, progress=False)  # released: the run goes ahead


def test_divergence_stops_before_saving_nan(tmp_path):
    run = tmp_path / "run"
    cfg = helpers.tiny_config(steps=8, lr=1e25, min_lr=0.0, warmup_steps=0)
    with pytest.raises(errors.UserError, match=r"diverged at step \d+"):
        loop.train(cfg, run, progress=False)
    if not checkpoint.exists(run):  # nothing resumable: the directory this call made is gone, a rerun starts clean
        assert not run.exists()
        return
    ckpts = checkpoint.Checkpoints(run, create=False)
    for step in ckpts.all_steps():  # whatever was saved is finite
        _, _, params, _ = checkpoint.load_run(run, step=step)
        assert all(np.isfinite(np.asarray(x)).all() for x in __import__("jax").tree.leaves(params))
    ckpts.close()


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("data.val_fraction", 0.0, "val_fraction"),
        ("seed", 2**40, "seed"),
        ("train.b1", 1.0, "b1"),
        ("train.b2", -0.1, "b2"),
        ("train.weight_decay", -1.0, "weight_decay"),
        ("train.grad_clip", -1.0, "grad_clip"),
        ("train.min_lr", 1.0, "min_lr"),
        ("train.lr", float("inf"), "finite"),
        ("mesh.rules", "nosuch", "unknown sharding rules"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, key, value, match):
    cfg = helpers.tiny_config(steps=2)
    section, _, name = key.rpartition(".")
    (cfg[section] if section else cfg)[name] = value
    with pytest.raises(errors.UserError, match=match):
        loop.train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_torn_metrics_and_damaged_config_resume(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = helpers.tiny_config(steps=8)
    with pytest.raises(loop.Interrupted):
        loop.train(cfg, run, stop_at=4, progress=False)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "split": "tr')  # a crash mid-line
    (run / "config.json").write_text("")
    (run / "summary.json").write_text("{")
    summary = loop.train(cfg, run, progress=False)
    err = capsys.readouterr().err
    assert "config.json is damaged" in err and "metrics.jsonl:" in err
    assert summary["steps"] == 8
    steps = [r["step"] for r in log.read_jsonl(run / "metrics.jsonl") if r["split"] == "train"]
    assert steps == list(range(1, 9))
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 8


def test_a_step_rotated_away_while_reading_is_not_called_damaged(finished, tmp_path, monkeypatch, capsys):
    import shutil

    run = _copy(finished, tmp_path)
    real = checkpoint.Checkpoints._read_meta

    def rotated(self, step):
        if step == 8 and (run / "checkpoints" / "8").exists():
            shutil.rmtree(run / "checkpoints" / "8")  # a training run's rotation, between listing and reading
        return real(self, step)

    monkeypatch.setattr(checkpoint.Checkpoints, "_read_meta", rotated)
    assert checkpoint.load_run(run)[3]["step"] == 4
    assert "damaged" not in capsys.readouterr().err


def test_a_run_cannot_be_shortened(finished, tmp_path):
    run = _copy(finished, tmp_path)
    with pytest.raises(errors.UserError, match="already at step 8, past train.steps=6"):
        loop.train(helpers.tiny_config(steps=6), run, progress=False)
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 8  # untouched


def test_a_batch_that_cannot_fit_is_refused_before_writing(tmp_path):
    cfg = helpers.tiny_config(steps=2)
    cfg.data.batch_size = 2**24
    with pytest.raises(errors.UserError, match="GiB to train"):
        loop.train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_failed_save_stops_with_one_line_and_the_rerun_resumes(tmp_path, monkeypatch):
    run = tmp_path / "run"
    real = checkpoint.Checkpoints.save

    def full_disk(self, step, state, meta):
        if step == 8:
            raise OSError(28, "No space left on device")
        return real(self, step, state, meta)

    monkeypatch.setattr(checkpoint.Checkpoints, "save", full_disk)
    with pytest.raises(errors.UserError, match="saving checkpoint step 8 .* resume from step 4"):
        loop.train(helpers.tiny_config(steps=8), run, progress=False)
    monkeypatch.setattr(checkpoint.Checkpoints, "save", real)  # space freed
    assert loop.train(helpers.tiny_config(steps=8), run, progress=False)["resumed_from"] == 4
