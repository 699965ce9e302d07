"""Mixed precision under a byte budget: the knapsack is solved exactly, the sizes are the packer's, the
sensitivities are the measured loss changes, and the packed file respects the budget."""

import itertools
import json

import jax
import numpy as np
import pytest

from research import cli, codes, errors, models, tree
from research.coding import pack
from research.compress import calib, core, mixed, registry
from research.models import config as model_config
from research.models import loss as loss_lib


def test_allocate_finds_the_optimum_of_small_knapsacks():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n_l, n_o = 5, 3
        sizes = rng.integers(10, 100, (n_l, n_o))
        sens = rng.random((n_l, n_o))
        sizes[1, 2], sens[1, 2] = -1, np.inf  # an option that does not apply to a leaf
        budget = float(rng.integers(sizes[sizes > 0].min() * n_l, 300))
        best, arg = np.inf, None
        for combo in itertools.product(range(n_o), repeat=n_l):
            b = sum(sizes[i, c] for i, c in enumerate(combo))
            s = sum(sens[i, c] for i, c in enumerate(combo))
            if min(sizes[i, c] for i, c in enumerate(combo)) >= 0 and b <= budget and s < best:
                best, arg = s, combo
        if arg is None:
            with pytest.raises(errors.UserError, match="short of the smallest allocation"):
                mixed.allocate(sens, sizes, budget, [f"l{i}" for i in range(n_l)], budget)
            continue
        got = mixed.allocate(sens, sizes, budget, [f"l{i}" for i in range(n_l)], budget)
        assert sum(sizes[i, c] for i, c in enumerate(got)) <= budget
        assert sum(sens[i, c] for i, c in enumerate(got)) == pytest.approx(best)


def _tiny():
    cfg = model_config.gpt2_style(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=16)
    graphdef, params = models.init(cfg)
    tokens = (np.arange(6000) * 7 % 61).astype(np.int32)
    return graphdef, params, calib.Calibration(graphdef, calib.sample(tokens, 16, 16, seed=0), batch_size=8)


OPTIONS = [dict(method="rtn", bits=b) for b in (2, 4, 8)]


def _packed(t, params, state, path):
    effective = jax.tree.map(np.asarray, t.apply(params, state))
    return pack.pack(effective, path, meta={}, exported=codes.to_numpy(core.export(t, params, state)))


def test_budgets_bound_the_packed_file_and_trade_loss_for_bytes(tmp_path):
    graphdef, params, data = _tiny()
    n = sum(int(np.size(x)) for x in tree.flatten(params).values())
    got = {}
    for bpw in (6.0, 7.0, 11.0):
        spec = dict(method="mixed", options=OPTIONS, budget_bits_per_weight=bpw)
        t = registry.make(**spec)
        state = t.init(params, jax.random.key(0), data)
        rep = mixed.report(spec, params, state)
        file_bytes = _packed(t, params, state, tmp_path / f"{bpw}.zlm")["file_bytes"]
        assert file_bytes <= bpw * n / 8, (bpw, file_bytes)
        predicted = rep["other_bytes"] + rep["allocated_bytes"]
        assert abs(file_bytes - predicted) < 200  # the header estimate (pipeline.HEADER_MARGIN covers it)
        # each leaf's bytes are exactly those its record takes in the file
        leaves = {leaf["path"]: leaf for leaf in pack.container.Reader(tmp_path / f"{bpw}.zlm").leaves}
        for row in rep["leaves"]:
            assert sum(s["length"] for s in leaves[row["leaf"]]["sections"].values()) == row["bytes"]
            assert leaves[row["leaf"]]["kind"] == "grid"
        got[bpw] = rep
    assert got[6.0]["allocated_bytes"] < got[7.0]["allocated_bytes"] <= got[11.0]["allocated_bytes"]
    assert got[6.0]["predicted_loss_increase"] >= got[7.0]["predicted_loss_increase"]
    assert got[6.0]["leaves_per_option"][0] > got[11.0]["leaves_per_option"][0]  # tighter: more 2-bit leaves


def test_loss_sensitivity_is_the_measured_loss_change_of_one_leaf():
    graphdef, params, data = _tiny()
    spec = dict(method="mixed", options=OPTIONS, budget_bits_per_weight=32.0)
    state = registry.make(**spec).init(params, jax.random.key(0), data)
    rep = mixed.report(spec, params, state)
    row = rep["leaves"][4]  # one leaf, option 0 (2 bits): recompute by hand
    one = registry.make("rtn", bits=2, where=row["leaf"])
    swapped = one.apply(params, one.init(params, jax.random.key(0), None))

    def loss(p):
        return np.mean(
            [float(loss_lib.loss_fn(p, graphdef, {"inputs": b[:, :-1], "targets": b[:, 1:]})) for b in data.batches()]
        )

    assert row["options_sensitivity"][0] == pytest.approx(loss(swapped) - loss(params), abs=1e-6)
    assert rep["budget_bytes"] == 32.0 * sum(int(np.size(x)) for x in tree.flatten(params).values()) / 8


def test_options_with_their_own_leaves_and_fisher_sensitivity(tmp_path):
    _, params, data = _tiny()
    options = [
        *[dict(method="rtn", bits=b, where=r"layers/\d+/mlp/\w+/kernel") for b in (3, 6)],
        *[dict(method="rtn", bits=b, where="embed/embedding", granularity="row") for b in (4, 8)],
    ]
    spec = dict(
        method="mixed",
        options=options,
        where=r"embed/embedding|layers/\d+/mlp/\w+/kernel",
        budget_bits_per_weight=16.0,
        sensitivity="fisher",
    )
    t = registry.make(**spec)
    state = t.init(params, jax.random.key(0), data)
    rep = mixed.report(spec, params, state)
    by_leaf = {r["leaf"]: r for r in rep["leaves"]}
    assert by_leaf["embed/embedding"]["option"] in (2, 3)  # only the row options apply to it
    assert by_leaf["embed/embedding"]["options_bytes"][:2] == [-1, -1]
    assert all(r["option"] in (0, 1) for p, r in by_leaf.items() if p != "embed/embedding")
    assert all(s is None or s >= 0 for r in rep["leaves"] for s in r["options_sensitivity"])  # 0.5 F d^2
    exported = codes.to_numpy(core.export(t, params, state))
    assert set(exported) == set(by_leaf) and exported["embed/embedding"].layout.granularity == "row"
    assert _packed(t, params, state, tmp_path / "m.zlm")["file_bytes"] <= rep["budget_bytes"]


def test_bad_arguments():
    with pytest.raises(errors.UserError, match="exactly one of"):
        mixed.mixed(OPTIONS)
    with pytest.raises(errors.UserError, match="exactly one of"):
        mixed.mixed(OPTIONS, budget_bytes=10, budget_bits_per_weight=2)
    with pytest.raises(errors.UserError, match="non-empty list"):
        mixed.mixed([], budget_bytes=10)
    with pytest.raises(errors.UserError, match="unknown compression method"):
        mixed.mixed([dict(method="nope")], budget_bytes=10)
    with pytest.raises(errors.UserError, match="sensitivity"):
        mixed.mixed(OPTIONS, budget_bytes=10, sensitivity="hessian")
    with pytest.raises(errors.UserError, match="needs measured sensitivities"):
        mixed.mixed(OPTIONS, max_loss_increase=0.01, sensitivity="fisher")
    _, params, data = _tiny()
    with pytest.raises(errors.UserError, match="short of the smallest allocation"):
        mixed.mixed(OPTIONS, budget_bits_per_weight=0.5).init(params, jax.random.key(0), data)
    with pytest.raises(errors.UserError, match="no option applies"):
        mixed.mixed([dict(method="rtn", where="embed/embedding", granularity="row")], budget_bytes=10**6).init(
            params, jax.random.key(0), data
        )
    with pytest.raises(errors.UserError, match="needs calibration"):
        mixed.mixed(OPTIONS, budget_bytes=10**6).init(params, jax.random.key(0), None)


def test_compress_job_reports_the_allocation_and_fine_tunes_under_it(tmp_path, capsys):
    from tests.compress.test_pipeline import SMALL
    from tests.test_cli import TINY

    run = tmp_path / "run"
    assert cli.main(["train", "--workdir", str(run), *TINY]) == 0
    out = tmp_path / "mixed"
    options = "[{'method': 'qat', 'bits': 2}, {'method': 'qat', 'bits': 4}]"
    spec = f"[{{'method': 'mixed', 'options': {options}, 'budget_bits_per_weight': 16.0}}]"
    args = [
        "compress",
        "--model",
        str(run),
        "--workdir",
        str(out),
        *SMALL,
        f"--config.compress={spec}",
        "--config.finetune.steps=2",
    ]
    assert cli.main(args) == 0
    capsys.readouterr()
    s = json.loads((out / "summary.json").read_text())
    (a,) = s["allocation"]
    assert a["within_budget"] and a["file_bytes"] == s["packed"]["file_bytes"] <= a["budget_bytes"]
    assert (
        sum(a["leaves_per_option"]) == len(a["leaves"]) == 6 and a["seconds"]["measure"] > 0
    )  # one block: q k v o up down
    assert s["finetuned"] is not None
    assert cli.main(["eval", "--model", str(out)]) == 0


def test_a_loss_budget_gives_the_smallest_allocation_within_it():
    _, params, data = _tiny()
    base = dict(method="mixed", options=OPTIONS)
    loose = registry.make(**base, budget_bits_per_weight=32.0).init(params, jax.random.key(0), data)
    sens = np.asarray(loose["sensitivity"], np.float64)
    sizes = np.asarray(loose["bytes"])
    limit = float(sens[:, 2].sum() + 0.5 * (sens[:, 0].sum() - sens[:, 2].sum()))  # between all-8 and all-2 bits
    spec = dict(base, max_loss_increase=limit)
    rep = mixed.report(spec, params, registry.make(**spec).init(params, jax.random.key(0), data))
    assert rep["predicted_loss_increase"] <= limit + 1e-6 and rep["budget_bytes"] is None
    choice = [r["option"] for r in rep["leaves"]]
    # optimal: no single-leaf move to a smaller option stays within the limit
    for i, c in enumerate(choice):
        for o in range(3):
            smaller = sizes[i, o] < sizes[i, c]
            fits = sum(sens[j, choice[j]] for j in range(len(choice))) - sens[i, c] + sens[i, o] <= limit
            assert not (smaller and fits), (i, c, o)
    with pytest.raises(errors.UserError, match="most accurate option"):
        mixed.mixed(OPTIONS, max_loss_increase=float(sens.min(axis=1).sum()) - 1.0).init(
            params, jax.random.key(0), data
        )
