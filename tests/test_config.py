from pathlib import Path

import pytest

from research import config, errors
from tests import helpers

CONFIGS = sorted((helpers.REPO / "experiments" / "configs").glob("*.py"))


def test_overrides_set_typed_values():
    cfg = config.base_config()
    config.apply_overrides(
        cfg,
        [
            "--config.train.lr=3e-4",
            "--config.train.steps",
            "7",
            "--config.train.min_lr=0",
            "--config.model.n_kv_head=2",
            "--config.data.corpus=some/file.txt",
            "--config.model.bias=True",
        ],
    )
    assert cfg.train.lr == 3e-4 and cfg.train.steps == 7
    assert cfg.train.min_lr == 0.0 and isinstance(cfg.train.min_lr, float)
    assert cfg.model.n_kv_head == 2 and cfg.data.corpus == "some/file.txt" and cfg.model.bias is True


@pytest.mark.parametrize(
    "arg, match",
    [
        ("--config.model.n_kv_head=two", "expects int"),
        ("--config.model.d_ff=1e3", "expects int"),
        ("--config.eval.stride=2.5", "expects int"),
        ("--config.data.corpus=None", "cannot be None"),
        ("--config.mesh.rules=None", "cannot be None"),
    ],
)
def test_typed_overrides_of_optional_and_string_entries(arg, match):
    with pytest.raises(errors.UserError, match=match):
        config.apply_overrides(config.base_config(), [arg])


def test_text_and_boolean_overrides():
    cfg = config.apply_overrides(
        config.base_config(),
        [
            "--config.wandb.project=2024",
            "--config.model.tie_embeddings=false",
            "--config.model.n_kv_head=None",
            "--config.data.corpus=a=b.txt",
            "--config.mesh.rules=[('kernel$', ('model', None))]",
        ],
    )
    assert cfg.wandb.project == "2024" and cfg.model.tie_embeddings is False and cfg.model.n_kv_head is None
    assert cfg.data.corpus == "a=b.txt" and cfg.mesh.rules == [("kernel$", ("model", None))]


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(errors.UserError, match=r"unknown config key 'train\.lrr' \(did you mean train\.lr"):
        config.apply_overrides(config.base_config(), ["--config.train.lrr=1"])


def test_wrong_type_is_a_user_error():
    with pytest.raises(errors.UserError, match="'train.steps' expects int"):
        config.apply_overrides(config.base_config(), ["--config.train.steps=ten"])


def test_non_override_argument_is_rejected():
    with pytest.raises(errors.UserError, match="unrecognised argument"):
        config.apply_overrides(config.base_config(), ["--lr=3"])


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("data.batch_size", 0, "data.batch_size must be a positive integer"),
        ("train.steps", -1, "train.steps must be a positive integer"),
        ("data.seq_len", 4096, "exceeds model.max_seq_len"),
        ("eval.stride", 1000, "eval.stride"),
        ("wandb.mode", "sometimes", "wandb.mode"),
        ("seed", -1, "seed must be an integer in 0 "),
        ("eval.max_windows", -1, "eval.max_windows must be a positive integer"),
    ],
)
def test_validate_names_the_problem(key, value, match):
    cfg = config.base_config()
    config.override(cfg, key, value)
    with pytest.raises(errors.UserError, match=match):
        config.validate(cfg)


def test_load_with_argument(tmp_path):
    f = tmp_path / "c.py"
    f.write_text(
        "from research import config\n"
        "def get_config(arg='1'):\n    c = config.base_config(); c.seed = int(arg); return c\n"
    )
    assert config.load(str(f)).seed == 1
    assert config.load(f"{f}:5").seed == 5


def test_load_errors(tmp_path):
    with pytest.raises(errors.UserError, match="does not exist"):
        config.load(str(tmp_path / "missing.py"))
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(errors.UserError, match="no get_config"):
        config.load(str(tmp_path / "empty.py"))
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(errors.UserError, match="not a Python file"):
        config.load(str(tmp_path / "c.txt"))
    (tmp_path / "noarg.py").write_text("def get_config():\n    return {}\n")
    with pytest.raises(errors.UserError, match="takes no argument"):
        config.load(f"{tmp_path / 'noarg.py'}:x")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_experiment_configs_load_and_validate(path: Path):
    from research.compress import pipeline

    cfg = config.load(str(path))
    if "calibration" in cfg:  # a compress config: its methods must build
        pipeline.validate(cfg)
        pipeline.build(cfg.compress)
    else:
        config.validate(cfg)
    assert "Command" in path.read_text() and "Expected" in path.read_text()
