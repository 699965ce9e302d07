"""Gradual pruning (schedule, monotone masks, fine-tuning under it) and SNIP scores."""

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from research import errors, models
from research.compress import calib, core
from research.compress.prune import gradual, masks, snip
from research.data import dataset
from research.models import config as model_config
from research.train import fit


def tiny():
    cfg = model_config.gpt2_style(vocab_size=64, n_layer=2, n_head=2, d_model=16, max_seq_len=16)
    return models.init(cfg)


def test_schedule_matches_the_formula():
    s_i, s_f, t0, n, k = 0.1, 0.9, 20, 200, 10
    schedule = gradual.polynomial(s_i, s_f, t0, n, k)
    for t in (0, 19, 20, 25, 30, 87, 150, 220, 221, 500):
        tq = min(max(t - t0, 0), n) // k * k
        want = s_f + (s_i - s_f) * (1 - tq / n) ** 3
        assert float(schedule(t)) == pytest.approx(want, abs=1e-6), t
    assert float(schedule(t0 + n)) == pytest.approx(s_f)


def test_the_last_step_reaches_the_target_when_steps_is_not_a_multiple_of_every():
    schedule = gradual.polynomial(0.0, 0.5, 0, 1000, 600)
    assert float(schedule(999)) < 0.5  # between updates: still the step-600 sparsity
    assert float(schedule(1000)) == pytest.approx(0.5)
    _, params = tiny()
    t = gradual.gradual(0.5, steps=10, every=6)
    state = t.init(params, jax.random.key(0), None)
    update = jax.jit(t.update)
    for step in range(1, 11):
        state = update(params, state, None, step)
    assert masks.sparsity_of(state["masks"])["total"] == pytest.approx(0.5, abs=0.01)


def test_a_finetune_stage_after_gradual_counts_for_its_schedule():
    from research.compress import pipeline

    cfg = pipeline.base_config()
    cfg.model = "unused"
    cfg.compress = [dict(method="gradual", sparsity=0.5, steps=100, every=10), {"finetune": 100}]
    pipeline.validate(cfg)  # finetune.steps stays 0: the stage is the gradual schedule's fine-tuning
    cfg.compress = [dict(method="gradual", sparsity=0.5, steps=100, every=10), {"finetune": 50}]
    with pytest.raises(errors.UserError, match=r"the \{'finetune': 50\} stage runs 50 steps"):
        pipeline.validate(cfg)


def test_masks_grow_on_schedule_and_never_regrow():
    _, params = tiny()
    t = gradual.gradual(0.8, initial=0.2, start=0, steps=40, every=10)
    state = t.init(params, jax.random.key(0), None)
    assert masks.sparsity_of(state["masks"])["total"] == pytest.approx(0.2, abs=0.01)
    update = jax.jit(t.update)
    seen, prev = [], state["masks"]
    for step in range(1, 51):
        state = update(params, state, None, step)
        total = masks.sparsity_of(state["masks"])["total"]
        seen.append(total)
        for path, m in core.touched(state["masks"]).items():  # a weight once pruned stays pruned
            assert not (np.asarray(m) & ~np.asarray(core.touched(prev)[path])).any()
        prev = state["masks"]
    assert seen[8] == seen[0]  # no change between updates
    assert seen[9] > seen[8]  # step 10 re-prunes
    assert seen[-1] == pytest.approx(0.8, abs=0.01)


def test_finetune_under_gradual_pruning_reaches_the_target_with_exact_zeros():
    graphdef, params = tiny()
    t = gradual.gradual(0.5, steps=20, every=5)
    state = t.init(params, jax.random.key(0), None)
    tokens = np.random.default_rng(0).integers(0, 64, 5000)
    batches = dataset.Batches(tokens, 4, 16, 0, "random")
    cfg = mlc.ConfigDict(dict(steps=30, lr=1e-2, min_lr=1e-3, warmup_steps=0, weight_decay=0.1, b1=0.9, b2=0.99))
    cfg.grad_clip, cfg.log_every = 1.0, 10
    logged = []

    class Log:
        def log(self, step, record, split="train"):
            logged.append(step)

    new, cstate, info = fit.finetune(graphdef, params, t, state, batches, cfg, logger=Log())
    assert not any(x.is_deleted() for x in jax.tree.leaves(state))  # the caller's state survives the donation
    assert logged == [10, 20, 30] and np.isfinite(info["loss"])
    assert float(cstate["sparsity"]) == pytest.approx(0.5)
    for path, m in core.touched(cstate["masks"]).items():
        raw = np.asarray(core.touched(new)[path])
        assert (raw[~np.asarray(m)] == 0).all(), path  # raw weights, not only the effective ones
        assert np.mean(np.asarray(m)) == pytest.approx(0.5, abs=0.01)


def test_gradual_bad_arguments():
    with pytest.raises(errors.UserError, match="exceeds the final"):
        gradual.gradual(0.3, initial=0.5)
    with pytest.raises(errors.UserError, match="positive integer every"):
        gradual.gradual(0.3, every=0)
    with pytest.raises(errors.UserError, match="uniform or global"):
        gradual.gradual(0.3, distribution="erk")


def test_snip_scores_are_gradient_times_weight():
    graphdef, params = tiny()
    c = calib.Calibration(graphdef, calib.sample(np.arange(3000) % 64, 4, 16, seed=1), batch_size=2)
    paths = ["layers/0/mlp/up/kernel"]
    got = snip.scores(c, params, paths)[paths[0]]
    batches = [c.inputs[:2], c.inputs[2:]]

    def loss(p, b):
        logits = models.merge(graphdef, p)(jnp.asarray(b[:, :-1]))
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, jnp.asarray(b[:, 1:])[..., None], -1).mean()

    g = sum(jax.grad(loss)(params, b)["layers"][0]["mlp"]["up"]["kernel"] for b in batches) / 2
    want = jnp.abs(g * params["layers"][0]["mlp"]["up"]["kernel"])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-9)
    state = snip.snip(0.5).init(params, jax.random.key(0), c)
    assert masks.sparsity_of(state["masks"])["total"] == pytest.approx(0.5, abs=1e-3)


def test_snip_needs_calibration():
    _, params = tiny()
    with pytest.raises(errors.UserError, match="snip needs calibration data"):
        snip.snip(0.5).init(params, jax.random.key(0), None)


def test_calibration_sample_is_deterministic_and_capped():
    tokens = np.arange(1000)
    a, b = calib.sample(tokens, 8, 64, seed=3, max_len=32), calib.sample(tokens, 8, 64, seed=3, max_len=32)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (8, 32) and (np.diff(a, axis=1) == 1).all()
    assert not np.array_equal(a, calib.sample(tokens, 8, 64, seed=4, max_len=32))
    with pytest.raises(errors.UserError, match="too few for windows of 64"):
        calib.sample(np.arange(50), 2, 64)
