"""`ziplm sweep` end to end on a tiny run: compress, train, eval and encode points, skipping and resuming, stale
and failed points, parallel children, the table and plots, W&B group / job type, the `wandb sweep` YAML."""

import csv
import json
import textwrap

import pytest
import yaml

from research import cli, config, errors, log
from research.sweep import jobs, points, runner, table
from tests.test_cli import TINY


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("sweep") / "run"
    assert cli.main(["train", "--workdir", str(path), *TINY]) == 0
    return path


def _write(tmp_path, body: str, name="s.py"):
    f = tmp_path / name
    f.write_text(textwrap.dedent(body))
    return str(f)


COMPRESS = """
from research.compress import pipeline

def get_config():
    base = pipeline.base_config()
    base.model = {run!r}
    base.calibration.update(n=4, length=32)
    base.finetune.update(steps={steps}, log_every=1)
    base.wandb.mode = "disabled"
    return dict(
        name="tiny",
        job="compress",
        base=base,
        axes=[
            {{"compress.0.method": ["magnitude", {second!r}]}},
            [{{"label": "30%", "compress.0.sparsity": 0.3}}, {{"label": "2:4", "compress.0.pattern": "2:4"}}],
        ],
        collect=dict(loss="final.loss", sparsity="sparsity", bytes="packed.file_bytes", missing="no.such.key"),
        plot=dict(x="label", y="loss", hue="method"),
    )
"""


def test_compress_sweep_runs_skips_and_tables(run, tmp_path, capsys):
    cfg = _write(tmp_path, COMPRESS.format(run=str(run), steps=1, second="wanda"))
    out = tmp_path / "out"
    assert runner.run(cfg, [], workdir=str(out)) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["point"] for r in rows] == [
        "method=magnitude,30%",
        "method=magnitude,2:4",
        "method=wanda,30%",
        "method=wanda,2:4",
    ]
    for r in rows:
        assert r["status"] == "done" and r["missing"] is None and r["seconds"] > 0
        summary = json.loads((out / r["point"] / "summary.json").read_text())
        assert r["loss"] == summary["finetuned"]["loss"] and r["bytes"] == summary["packed"]["file_bytes"]
        assert summary["methods"][0]["method"] == r["method"]
        point = json.loads((out / r["point"] / "point.json").read_text())
        assert point["overrides"] == r["overrides"] and point["status"] == "done"
    assert [r["sparsity"] for r in rows] == pytest.approx([0.3, 0.5, 0.3, 0.5], abs=0.01)
    assert rows[1]["pattern"] == "2:4" and rows[0]["label"] == "30%" and rows[0]["compress.0.sparsity"] == 0.3
    with (out / "results.csv").open() as f:
        assert [r["point"] for r in csv.DictReader(f)] == [r["point"] for r in rows]
    md = (out / "results.md").read_text().splitlines()
    assert md[0].startswith("| point | status |") and len(md) == 2 + len(rows)
    assert (out / "loss_vs_label.png").stat().st_size > 1000
    # A second run skips every finished point (nothing is rewritten).
    stamp = (out / rows[0]["point"] / "summary.json").stat().st_mtime_ns
    capsys.readouterr()
    assert runner.run(cfg, [], workdir=str(out)) == 0
    assert "4 done, 0 to run" in capsys.readouterr().out
    assert (out / rows[0]["point"] / "summary.json").stat().st_mtime_ns == stamp
    # Changing the base makes every point stale: refused without --overwrite, rerun with it.
    assert runner.run(cfg, [], workdir=str(out), dry_run=True) == 0
    assert capsys.readouterr().out.count(" done ") == 4
    with pytest.raises(errors.UserError, match="ran with another config"):
        runner.run(cfg, ["--config.base.finetune.steps=2"], workdir=str(out))
    assert runner.run(cfg, ["--config.base.finetune.steps=2"], workdir=str(out), only="wanda,2:4", overwrite=True) == 0
    rows = table.rows(points.load(cfg, ["--config.base.finetune.steps=2"]), points.of(points.load(cfg)), out)
    assert [r["status"] for r in rows] == ["stale", "stale", "stale", "done"]
    assert json.loads((out / "method=wanda,2:4" / "summary.json").read_text())["finetune"]["steps"] == 2


def test_a_failed_point_is_recorded_and_the_others_run(run, tmp_path, capsys):
    cfg = _write(tmp_path, COMPRESS.format(run=str(run), steps=0, second="no_such_method"))
    out = tmp_path / "out"
    assert runner.run(cfg, [], workdir=str(out), only="30%") == 1
    rows = {r["point"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert rows["method=magnitude,30%"]["status"] == "done"
    bad = rows["method=no_such_method,30%"]
    assert bad["status"] == "failed" and "unknown compression method 'no_such_method'" in bad["error"]
    assert rows["method=magnitude,2:4"]["status"] == "pending"
    assert "1 point(s) failed: method=no_such_method,30%" in capsys.readouterr().err


def test_train_sweep_resumes_an_interrupted_point(tmp_path):
    from research.train import loop

    base = config.base_config()
    for item in TINY:
        key, value = item.removeprefix("--config.").split("=", 1)
        config.override(base, key, value)
    base.wandb.mode = "disabled"
    (tmp_path / "base.json").write_text(config.to_json(base))
    cfg = _write(
        tmp_path,
        f"""
        import json
        from research import config

        def get_config():
            base = config.from_dict(json.load(open({str(tmp_path / "base.json")!r})))
            return dict(name="t", job="train", base=base, axes=[{{"train.lr": [1e-3, 3e-3]}}])
        """,
    )
    sweep = points.load(cfg)
    first = points.of(sweep)[0]
    out = tmp_path / "out"
    with pytest.raises(loop.Interrupted):
        loop.train(jobs.config(sweep, first), out / first.name, stop_at=2)
    assert jobs.status("train", jobs.config(sweep, first), out / first.name) == "partial"
    assert runner.run(cfg, [], workdir=str(out)) == 0
    summary = json.loads((out / "lr=0.001" / "summary.json").read_text())
    assert summary["resumed_from"] == 2 and summary["steps"] == base.train.steps
    assert json.loads((out / "lr=0.003" / "summary.json").read_text())["resumed_from"] is None
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == [1e-3, 3e-3] and all(r["val_loss"] > 0 for r in rows)


def test_eval_and_encode_sweeps_run_the_commands(run, tmp_path):
    data = tmp_path / "input.txt"
    data.write_bytes(b"the quick brown fox jumps over the lazy dog\n" * 8)
    cfg = _write(
        tmp_path,
        f"""
        def get_config():
            return dict(
                name="e", job="eval", base=dict(model={str(run)!r}, split="val", window=None, batch_size=4),
                axes=[{{"window": [8, 16]}}], wandb=dict(mode="disabled"),
            )
        """,
    )
    out = tmp_path / "eval"
    assert runner.run(cfg, [], workdir=str(out), n_jobs=2) == 0  # two child processes
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for r, w in zip(rows, (8, 16)):
        direct = tmp_path / f"direct{w}.json"
        assert (
            cli.main(["eval", "--model", str(run), "--window", str(w), "--batch-size", "4", "--json", str(direct)]) == 0
        )
        assert r["bits_per_byte"] == json.loads(direct.read_text())["bits_per_byte"]
        assert (out / f"window={w}.log").is_file()
    cfg = _write(
        tmp_path,
        f"""
        def get_config():
            return dict(name="c", job="encode", base=dict(model={str(run)!r}, input={str(data)!r}),
                        axes=[{{"batch_size": [1, 4]}}], wandb=dict(mode="disabled"))
        """,
        name="c.py",
    )
    out = tmp_path / "enc"
    assert runner.run(cfg, [], workdir=str(out)) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["roundtrip"] for r in rows] == [True, True]
    assert all(r["input_bytes"] == len(data.read_bytes()) and r["coded_bytes"] > 0 for r in rows)
    assert (out / "batch_size=4" / "coded.bin").stat().st_size == rows[1]["coded_bytes"]


def test_wandb_group_job_type_and_sweep_yaml(run, tmp_path, monkeypatch):
    cfg = _write(tmp_path, COMPRESS.format(run=str(run), steps=0, second="wanda"))
    sweep = points.load(cfg)
    p = points.of(sweep)[3]
    c = jobs.config(sweep, p)
    assert (c.wandb.group, c.wandb.name, c.wandb.job_type) == ("tiny", "method=wanda,2:4", "wanda")
    c.compress = [{"method": "sparsegpt"}, {"finetune": 10}, {"method": "gptq"}]
    assert jobs.job_type("compress", c) == "sparsegpt+finetune+gptq"
    import wandb

    seen = {}

    class FakeRun:
        def log(self, *a, **k):
            pass

        def finish(self):
            pass

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(wandb, "init", lambda **kw: seen.update(kw) or FakeRun())
    (tmp_path / "w").mkdir()
    logger = log.Logger(tmp_path / "w", {"seed": 0}, dict(c.wandb.to_dict(), mode="offline"))
    logger.close()
    assert (seen["group"], seen["job_type"], seen["name"]) == ("tiny", "wanda", "method=wanda,2:4")
    assert seen["config"]["sweep"] == {
        "point": "method=wanda,2:4",
        "compress.0.method": "wanda",
        "compress.0.pattern": "2:4",
    }
    y = tmp_path / "sweep.yaml"
    assert cli.main(["sweep", cfg, "--wandb-yaml", str(y), "--workdir", str(tmp_path / "o")]) == 0
    spec = yaml.safe_load(y.read_text())
    assert spec["method"] == "grid" and spec["parameters"]["point"]["values"][3] == "method=wanda,2:4"
    assert spec["command"][:3] == ["ziplm", "sweep", cfg] and spec["command"][-1] == "${args}"


def test_cli_errors_are_one_line(tmp_path, capsys):
    cfg = _write(tmp_path, "def get_config():\n    return dict(name='x', job='compress', axes=[{'no.such': [1]}])\n")
    assert cli.main(["sweep", cfg, "--dry-run"]) == 2
    assert "unknown config key 'no.such'" in capsys.readouterr().err
    cfg = _write(tmp_path, "def get_config():\n    return dict(name='x', job='compress', axes=[{'seed': [1]}])\n")
    assert cli.main(["sweep", cfg, "--only", "zzz", "--dry-run"]) == 2
    assert "matches no point" in capsys.readouterr().err
    assert cli.main(["sweep", cfg, "--point", "seed=2"]) == 2
    assert "no point named 'seed=2'" in capsys.readouterr().err


def test_eval_options_are_checked_against_the_command(tmp_path, capsys):
    cfg = _write(
        tmp_path,
        "def get_config():\n    return dict(name='x', job='eval', base=dict(model='m'), axes=[{'windw': [8]}])\n",
    )
    assert cli.main(["sweep", cfg, "--dry-run"]) == 2
    assert "'windw' is not an option of ziplm eval (did you mean window, max_windows?)" in capsys.readouterr().err
