"""Sweep axes: products of zipped groups, labels, point names, table columns, and the refusals."""

import pytest

from research import errors
from research.sweep import points


def test_product_of_groups_zips_within_a_group():
    pts = points.points(
        [
            {"compress.0.method": ["magnitude", "wanda"]},
            {"compress.0.sparsity": [0.3, 0.5], "finetune.steps": [0, 200]},
        ]
    )
    assert [p.overrides for p in pts] == [
        {"compress.0.method": "magnitude", "compress.0.sparsity": 0.3, "finetune.steps": 0},
        {"compress.0.method": "magnitude", "compress.0.sparsity": 0.5, "finetune.steps": 200},
        {"compress.0.method": "wanda", "compress.0.sparsity": 0.3, "finetune.steps": 0},
        {"compress.0.method": "wanda", "compress.0.sparsity": 0.5, "finetune.steps": 200},
    ]
    assert [p.name for p in pts] == [
        "method=magnitude,sparsity=0.3,steps=0",
        "method=magnitude,sparsity=0.5,steps=200",
        "method=wanda,sparsity=0.3,steps=0",
        "method=wanda,sparsity=0.5,steps=200",
    ]
    assert [p.index for p in pts] == [0, 1, 2, 3]


def test_option_lists_and_labels_name_heterogeneous_points():
    chains = [
        {"label": "prune", "compress": [{"method": "magnitude", "sparsity": 0.5}]},
        {"label": "prune+quant", "compress": [{"method": "magnitude"}, {"method": "rtn", "bits": 4}], "seed": 1},
        {"compress": [{"method": "rtn", "bits": 3}]},  # no label: the list value is shown by a hash
    ]
    pts = points.points([chains])
    assert pts[0].name == "prune" and pts[0].labels == {"label": "prune"}
    assert pts[1].overrides == {"compress": [{"method": "magnitude"}, {"method": "rtn", "bits": 4}], "seed": 1}
    assert pts[2].name.startswith("compress=h") and len(pts[2].name) == len("compress=h") + 8 and pts[2].labels == {}
    two = points.points([[{"label": "a", "x.y": 1}], [{"label": "b", "z": 2}, {"label": "c", "z": 3}]])
    assert [p.name for p in two] == ["a,b", "a,c"]
    assert two[1].labels == {"label0": "a", "label1": "c"}


def test_ambiguous_short_keys_and_odd_characters():
    pts = points.points([{"model.dropout": [0.1], "train.dropout": [0.2], "data.corpus": ["wikitext:/a/b c"]}])
    assert pts[0].name == "model.dropout=0.1,train.dropout=0.2,corpus=wikitext:-a-b-c"
    assert points.column("model.dropout", ["model.dropout", "train.dropout"]) == "model.dropout"
    assert points.column("train.lr", ["train.lr"]) == "lr"
    long = points.points([{"name": ["x" * 300]}])[0].name
    assert len(long) == points.MAX_NAME


@pytest.mark.parametrize(
    "axes, message",
    [
        ([{"a": [1, 2], "b": [1]}], "different lengths"),
        ([{"a": 1}], "must be a list of values"),
        ([{"a": [1]}, {"a": [2]}], "both set ['a']"),
        ([[{"label": "x", "a": 1}, {"label": "x", "a": 2}]], "both named 'x'"),
        ([{}], "is empty"),
        (["a"], "dict of lists"),
        ({"a": [1]}, "list of groups"),
        ([[1]], "must be a dict of overrides"),
    ],
)
def test_malformed_axes_are_one_line_errors(axes, message):
    with pytest.raises(errors.UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        points.points(axes)


def test_sweep_config_is_checked(tmp_path):
    f = tmp_path / "s.py"
    f.write_text("def get_config():\n    return dict(name='a b', job='compress', axes=[])\n")
    with pytest.raises(errors.UserError, match="names a directory"):
        points.load(str(f))
    f.write_text("def get_config():\n    return dict(name='a', job='fit', axes=[])\n")
    with pytest.raises(errors.UserError, match="job must be one of"):
        points.load(str(f))
    f.write_text("def get_config():\n    return dict(name='a', job='eval')\n")
    with pytest.raises(errors.UserError, match="no 'axes' entry"):
        points.load(str(f))


def test_extra_points_follow_the_product():
    pts = points.points([{"a": [1, 2]}], extra=[{"label": "control", "a": 0, "b": 1}, {"c": 3}])
    assert [p.name for p in pts] == ["a=1", "a=2", "control", "c=3"]
    assert pts[2].overrides == {"a": 0, "b": 1} and pts[2].labels == {"label": "control"} and pts[3].index == 3
