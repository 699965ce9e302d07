import jax
import jax.numpy as jnp
import numpy as np

from research import config as config_lib
from research import models
from research.models import config as mc
from research.train import optim
from research.train import step as step_lib

CFG = mc.llama_style(vocab_size=32, n_layer=2, n_head=2, n_kv_head=1, d_model=16, max_seq_len=16)


def _batch(seed=0):
    x = jax.random.randint(jax.random.key(seed), (4, 17), 0, 32)
    return {"inputs": x[:, :-1], "targets": x[:, 1:]}


def _setup(cfg=CFG, lr=1e-2):
    t = config_lib.base_config().train
    t.lr, t.warmup_steps, t.steps = lr, 0, 100
    tx = optim.make(t)
    graphdef, params = models.init(cfg)
    return graphdef, tx, step_lib.init_state(params, tx)


def test_train_step_overfits_one_batch():
    graphdef, tx, state = _setup()
    step = step_lib.make_train_step(graphdef, tx, seed=0, dropout=False)
    batch = _batch()
    losses = []
    for _ in range(60):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[0] > 3.0 and losses[-1] < 0.5 * losses[0]
    assert int(state["step"]) == 60


def test_train_step_is_deterministic_and_donates():
    graphdef, tx, s1 = _setup()
    _, _, s2 = _setup()
    step = step_lib.make_train_step(graphdef, tx, seed=0, dropout=True)
    old_leaf = jax.tree.leaves(s1["params"])[0]
    a, ma = step(s1, _batch())
    b, mb = step(s2, _batch())
    assert old_leaf.is_deleted()  # the old state's buffers were donated
    assert float(ma["loss"]) == float(mb["loss"])
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_loss_matches_manual_cross_entropy():
    graphdef, params = models.init(CFG)
    batch = _batch()
    logits = models.merge(graphdef, params)(batch["inputs"])
    logp = jax.nn.log_softmax(logits, -1)
    want = -jnp.take_along_axis(logp, batch["targets"][..., None], -1).mean()
    np.testing.assert_allclose(step_lib.loss_fn(params, graphdef, batch), want, rtol=1e-6)


def test_apply_fn_sees_effective_params():
    graphdef, params = models.init(CFG)
    zeroed = step_lib.loss_fn(params, graphdef, _batch(), apply_fn=lambda p: jax.tree.map(jnp.zeros_like, p))
    np.testing.assert_allclose(zeroed, np.log(32), rtol=1e-6)


def test_bf16_compute_fp32_master_weights():
    graphdef, tx, state = _setup(CFG.replace(dtype="bfloat16"))
    step = step_lib.make_train_step(graphdef, tx, seed=0, dropout=False)
    g32, _, _ = _setup()
    fp32_loss = step_lib.loss_fn(state["params"], g32, _batch())
    state, m = step(state, _batch())
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state["params"]))
    assert abs(float(m["loss"]) - float(fp32_loss)) < 0.05
