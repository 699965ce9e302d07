import json

from research import files, log


def test_jsonl_records_and_resume_truncation(tmp_path):
    logger = log.Logger(tmp_path, {"seed": 0}, {"mode": "disabled"})
    for step in (1, 2, 3):
        logger.log(step, {"loss": 1.0 / step})
    logger.log(3, {"loss": 0.5, "protocol": "x"}, split="val")
    logger.close()
    records = log.read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 3] and records[-1] == {
        "step": 3,
        "split": "val",
        "loss": 0.5,
        "protocol": "x",
    }
    resumed = log.Logger(tmp_path, {}, {"mode": "disabled"}, resume_step=2)
    resumed.log(3, {"loss": 0.25})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in log.read_jsonl(tmp_path / "metrics.jsonl")] == [
        (1, 1.0),
        (2, 0.5),
        (3, 0.25),
    ]


def test_wandb_offline_needs_no_network(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "")
    logger = log.Logger(tmp_path, {"seed": 0}, {"mode": "offline", "project": "ziplm-test"})
    assert logger._wandb is not None
    logger.log(1, {"loss": 2.0})
    logger.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    assert (tmp_path / "wandb_id").read_text().strip()


def test_wandb_failure_never_stops_the_run(tmp_path, monkeypatch, capsys):
    import wandb

    monkeypatch.delenv("WANDB_MODE", raising=False)

    def broken(**kw):
        raise wandb.errors.UsageError("no API key")

    monkeypatch.setattr(wandb, "init", broken)
    logger = log.Logger(tmp_path, {}, {"mode": "online"})
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert "W&B disabled for this run" in capsys.readouterr().err
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 1.0


def test_write_json_atomic_leaves_no_temporary(tmp_path):
    files.write_json(tmp_path / "a.json", {"x": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
