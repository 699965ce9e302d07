"""The study sweeps of experiments/sweeps/: every config loads, builds every point's config (overrides checked)
and has the points its docstring promises; the frontier's points are its candidates."""

import pytest

from research import cli
from research.sweep import jobs, points
from tests.test_cli import TINY

SWEEPS = {"prune_study": 34, "quant_study": 86, "lossless_frontier": 43, "text_models": 5}


@pytest.fixture(scope="module")
def study_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("study") / "run"
    assert cli.main(["train", "--workdir", str(path), *TINY]) == 0
    mp = pytest.MonkeyPatch()
    mp.setenv("ZIPLM_STUDY_MODEL", str(path))
    yield path
    mp.undo()


@pytest.mark.parametrize("name", SWEEPS)
def test_study_sweeps_build_every_point(study_model, name):
    sweep = points.load(f"experiments/sweeps/{name}.py")
    pts = points.of(sweep)
    assert len(pts) == SWEEPS[name]
    for p in pts:
        cfg = jobs.config(sweep, p)
        assert cfg.model == str(study_model) and cfg.compress
    assert len({jobs.digest("compress", jobs.config(sweep, p)) for p in pts}) == len(pts)


def test_missing_study_model_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ZIPLM_STUDY_MODEL", str(tmp_path / "nothing"))
    assert cli.main(["sweep", "experiments/sweeps/prune_study.py", "--dry-run"]) == 2
    assert "train it first" in capsys.readouterr().err


def test_study_scripts_train_the_model_their_sweeps_use(study_model, tmp_path, monkeypatch):
    """`study.run_sweep` (prune_study, quant_study, lossless_frontier) trains the model that `study.base` reads,
    ZIPLM_STUDY_MODEL's where it is set, and only when it is missing."""
    from experiments.sweeps import study
    from research.sweep import runner
    from research.train import loop

    trained, ran = [], []
    monkeypatch.setattr(loop, "train", lambda cfg, workdir: trained.append(str(workdir)))
    monkeypatch.setattr(runner, "run", lambda sweep, overrides, n_jobs, only: ran.append((sweep, n_jobs, only)) or 0)
    monkeypatch.setattr(runner, "finished", lambda sweep: [{"point": "p"}])
    assert study.run_sweep("s.py", 2, "x") == (0, [{"point": "p"}]) and trained == []  # the tiny run exists
    monkeypatch.setenv("ZIPLM_STUDY_MODEL", str(tmp_path / "missing"))
    study.run_sweep("s.py")
    assert trained == [str(tmp_path / "missing")] and ran == [("s.py", 2, "x"), ("s.py", 1, None)]
