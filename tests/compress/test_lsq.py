"""Learned step sizes (LSQ): the train step differentiates the transform's state, `learn` takes the Adam step on
log(scale), and the learned grid trades clipping for resolution."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from research import errors, models
from research.compress import core
from research.compress.prune import magnitude
from research.compress.quant import qat
from research.models import config as model_config
from research.train import step as train_step


def tiny():
    cfg = model_config.gpt2_style(vocab_size=64, n_layer=1, n_head=2, d_model=32, max_seq_len=16)
    return models.init(cfg)


def _batch():
    tokens = jax.random.randint(jax.random.key(1), (4, 17), 0, 64)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def test_train_step_takes_the_adam_step_on_the_scale_gradient():
    graphdef, params = tiny()
    lr = 1e-2
    t = qat.qat(4, learn_scale=True, scale_lr=lr)
    cstate = t.init(params, jax.random.key(0), None)
    batch = _batch()

    def loss(scale):
        return train_step.loss_fn(params, graphdef, batch, None, lambda p: t.apply(p, {**cstate, "scale": scale}))

    g = core.touched(jax.grad(loss)(cstate["scale"]))  # the LSQ gradient, computed on its own
    before = {p: np.asarray(s) for p, s in core.touched(cstate["scale"]).items()}  # the step donates its input
    tx = optax.sgd(0.0)  # the weights stay put; only the scales move
    state = {**train_step.init_state(params, tx), "compress": cstate}
    step = train_step.make_train_step(graphdef, tx, seed=0, dropout=False, transform=t)
    new, _ = step(state, batch)
    for p, s0 in before.items():
        gp = np.asarray(g[p])
        # Adam's first step on log(scale), gradient g * s: -lr * m / (sqrt(v) + eps) with bias-corrected
        # m = g * s and v = (g * s)**2, i.e. about lr * sign(g) (eps = 1e-8).
        glog = gp.astype(np.float64) * s0
        want = s0 * np.exp(-lr * glog / (np.abs(glog) + 1e-8))
        np.testing.assert_allclose(core.touched(new["compress"]["scale"])[p], want, rtol=1e-4)
        assert (gp != 0).mean() > 0.9  # the gradient reaches almost every scale


def test_learned_scale_reaches_the_best_clipping():
    # 3-bit symmetric grid on Gaussian weights: min/max puts the step at max|w| / 3 (~1.3 sigma); the squared error
    # is smallest near 0.6 sigma (clipping the tails for resolution, as Lloyd-Max quantizers do). LSQ on the
    # reconstruction error must find that step: its error within 0.1% of a grid search over steps.
    w = jax.random.normal(jax.random.key(0), (4096, 1)) * 0.1
    params = {"layers": {0: {"mlp": {"up": {"kernel": w}}}}}
    t = qat.qat(3, learn_scale=True, scale_lr=0.02)
    state = t.init(params, jax.random.key(0), None)

    def err(s):
        return jnp.sum((t.apply(params, s)["layers"][0]["mlp"]["up"]["kernel"] - w) ** 2)

    grad = jax.jit(jax.grad(err, allow_int=True))
    start = float(state["scale"]["layers"][0]["mlp"]["up"]["kernel"][0])
    for i in range(200):
        state = t.learn(state, grad(state), i + 1)
    learned = float(state["scale"]["layers"][0]["mlp"]["up"]["kernel"][0])
    x = np.asarray(w, np.float64)
    best = min(((np.clip(np.round(x / s), -4, 3) * s - x) ** 2).sum() for s in np.linspace(0.02, 0.15, 1301))
    assert learned < 0.5 * start
    assert float(err(state)) <= best * 1.001


def test_lsq_fine_tunes_with_masks_held_and_weights_on_the_learned_grid():
    graphdef, params = tiny()
    t = core.chain(magnitude.magnitude(0.5), qat.qat(4, learn_scale=True, scale_lr=1e-2))
    cstate = t.init(params, jax.random.key(0), None)
    first = {p: np.asarray(s) for p, s in core.touched(cstate[1]["scale"]).items()}
    tx = core.keep_masked(optax.adam(1e-2))
    state = {**train_step.init_state(params, tx), "compress": cstate}
    step = train_step.make_train_step(graphdef, tx, seed=0, dropout=False, transform=t)
    batch, losses = _batch(), []
    for _ in range(10):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    masks, qstate = core.touched(t.masks(state["compress"])), state["compress"][1]
    eff = core.touched(t.apply(state["params"], state["compress"]))
    for p, s in core.touched(qstate["scale"]).items():
        assert not np.allclose(s, first[p])  # the scales were learned
        q = np.asarray(eff[p]) / np.asarray(s)[None] + np.asarray(core.touched(qstate["zero"])[p], np.float32)
        np.testing.assert_allclose(q, np.round(q), atol=1e-3)
        assert (np.asarray(eff[p])[~np.asarray(masks[p])] == 0).all()  # pruned weights stay exactly zero


def test_bad_scale_lr():
    for lr in (0, -1.0, "1e-3"):
        with pytest.raises(errors.UserError, match="scale_lr"):
            qat.qat(4, learn_scale=True, scale_lr=lr)
