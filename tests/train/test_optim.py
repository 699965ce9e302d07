import jax.numpy as jnp
import ml_collections as mlc
import pytest

from research.train import optim


def _t(**kw):
    return mlc.ConfigDict(
        dict(steps=1000, lr=1e-3, min_lr=1e-4, warmup_steps=100, weight_decay=0.1, b1=0.9, b2=0.99, grad_clip=1.0) | kw
    )


def test_schedule_warmup_then_cosine_to_min_lr():
    s = optim.schedule(_t())
    assert float(s(0)) == 0.0
    assert float(s(50)) == pytest.approx(5e-4)
    assert float(s(100)) == pytest.approx(1e-3)
    assert float(s(550)) == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-4)  # half way through the cosine
    assert float(s(1000)) == pytest.approx(1e-4)


def test_weight_decay_only_on_matrices():
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,)), "scale": jnp.ones((2,))}
    assert optim.decay_mask(params) == {"w": True, "b": False, "scale": False}
    tx = optim.make(_t(lr=1.0, warmup_steps=0, weight_decay=0.5, grad_clip=0.0))
    state = tx.init(params)
    zero = {k: jnp.zeros_like(v) for k, v in params.items()}
    updates, _ = tx.update(zero, state, params)
    # With zero gradients only decay moves weights: -lr * wd * w on matrices, nothing elsewhere.
    assert float(updates["w"][0, 0]) == pytest.approx(-0.5)
    assert float(updates["b"][0]) == 0.0 and float(updates["scale"][0]) == 0.0
