import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from research import errors, log, models, tree
from research.models import config as mc
from research.parallel import sharding
from research.train import loop, optim
from research.train import step as step_lib
from tests import helpers

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (forced) CPU devices")

CFG = mc.llama_style(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, max_seq_len=16)


def test_tensor_rules_by_hand():
    mesh = sharding.make_mesh(2, 4)
    _, params = models.abstract(CFG)
    specs = tree.flatten(sharding.param_specs(params, "tensor", mesh))
    assert specs["layers/0/attn/q/kernel"] == P(None, "model")
    assert specs["layers/0/attn/o/kernel"] == P("model", None)
    assert specs["layers/1/mlp/down/kernel"] == P("model", None)
    assert specs["embed/embedding"] == P("model", None)
    assert specs["layers/0/attn_norm/scale"] == P()


def test_undivisible_dimension_stays_replicated():
    mesh = sharding.make_mesh(1, 8)
    params = {"a": {"kernel": jax.ShapeDtypeStruct((12, 16), np.float32)}}
    assert tree.flatten(sharding.param_specs(params, "fsdp", mesh))["a/kernel"] == P(None, None)


def test_optimizer_state_mirrors_parameter_shardings():
    mesh = sharding.make_mesh(2, 4)
    _, params = models.abstract(CFG)
    sh = sharding.named(sharding.param_specs(params, "fsdp", mesh), mesh)
    tx = optim.make(helpers.tiny_config().train)
    opt = jax.eval_shape(tx.init, params)
    mirrored = tree.flatten(sharding.mirror(opt, params, sh, mesh))
    mu = [v for k, v in mirrored.items() if k.endswith("mu/layers/0/mlp/up/kernel")]
    assert mu and mu[0].spec == P("model", None)
    assert all(v.spec == P() for k, v in mirrored.items() if k.endswith("count"))


def test_bad_mesh_and_batch_are_user_errors():
    with pytest.raises(errors.UserError, match="divide"):
        sharding.make_mesh(-1, 3)
    with pytest.raises(errors.UserError, match="needs 16 devices"):
        sharding.make_mesh(4, 4)
    with pytest.raises(errors.UserError, match="not divisible"):
        sharding.check_batch(6, sharding.make_mesh(2, 4), ("data", "model"))


@pytest.mark.parametrize("rules, mesh_shape", [("fsdp", (2, 4)), ("tensor", (2, 4)), ("replicated", (8, 1))])
def test_sharded_loss_and_steps_equal_unsharded(rules, mesh_shape):
    graphdef, params = models.init(CFG)
    tx = optim.make(helpers.tiny_config(warmup_steps=0).train)
    x = jax.random.randint(jax.random.key(1), (8, 17), 0, 64)
    batch = {"inputs": x[:, :-1], "targets": x[:, 1:]}

    plain = step_lib.make_train_step(graphdef, tx, seed=0, dropout=False)
    state = step_lib.init_state(params, tx)
    want = []
    for _ in range(3):
        state, m = plain(state, batch)
        want.append(float(m["loss"]))

    mesh = sharding.make_mesh(*mesh_shape)
    param_sh = sharding.named(sharding.param_specs(params, rules, mesh), mesh)
    abstract = step_lib.abstract_state(params, tx)
    state_sh = sharding.mirror(abstract, params, param_sh, mesh)
    batch_sh = sharding.batch_sharding(mesh, sharding.batch_axes_for(rules))
    sharded = step_lib.make_train_step(
        graphdef, tx, seed=0, dropout=False, state_shardings=state_sh, batch_sharding=batch_sh
    )
    params_copy = jax.tree.map(lambda a: a.copy(), models.init(CFG)[1])
    state = jax.device_put(step_lib.init_state(params_copy, tx), state_sh)
    got = []
    for _ in range(3):
        state, m = sharded(state, jax.device_put(batch, batch_sh))
        got.append(float(m["loss"]))
    np.testing.assert_allclose(got, want, atol=1e-5)
    q = state["params"]["layers"][0]["attn"]["q"]["kernel"]
    if rules != "replicated":
        assert len(q.sharding.device_set) == 8 and q.addressable_shards[0].data.shape != q.shape


def test_training_loop_sharded_equals_unsharded(tmp_path):
    def losses(run, **mesh):
        cfg = helpers.tiny_config(steps=6)
        cfg.mesh.update(mesh)
        loop.train(cfg, tmp_path / run, progress=False)
        return [r["loss"] for r in log.read_jsonl(tmp_path / run / "metrics.jsonl") if r["split"] == "train"]

    np.testing.assert_allclose(losses("fsdp", data=2, model=4, rules="fsdp"), losses("single"), atol=1e-5)
