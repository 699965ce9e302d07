"""KV-cache decoding equals the full forward, is bit-deterministic, and generate samples as documented."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import errors, models
from research.models import config as mc
from research.models import decode

CONFIGS = {
    "gpt2": mc.gpt2_style(vocab_size=64, n_layer=2, n_head=2, d_model=16, max_seq_len=32),
    "llama-gqa-window": mc.llama_style(
        vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=16, max_seq_len=32, sliding_window=5
    ),
    "neox": mc.ModelConfig(
        vocab_size=64, n_layer=2, n_head=2, d_model=16, max_seq_len=32, position="rope", rotary_dim=4,
        parallel_residual=True, activation="gelu",
    ),
}  # fmt: skip
TOKENS = np.asarray(jax.random.randint(jax.random.key(0), (3, 24), 0, 64))


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("blocks", [(1,) * 24, (7, 1, 16), (24,)], ids=["one-by-one", "mixed", "one-block"])
def test_incremental_logits_equal_the_full_forward(name, blocks):
    cfg = CONFIGS[name]
    graphdef, params = models.init(cfg, 1)
    full = np.asarray(models.merge(graphdef, params)(jnp.asarray(TOKENS)))
    cache, outs, at = decode.init_cache(cfg, 3), [], 0
    for n in blocks:
        logits, cache = decode.step(graphdef, params, cache, TOKENS[:, at : at + n])
        outs.append(np.asarray(logits))
        at += n
    assert int(cache.length) == 24
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-5, rtol=0)


def test_step_is_bit_identical_for_the_same_inputs():
    cfg = CONFIGS["llama-gqa-window"]
    graphdef, params = models.init(cfg, 2)

    def run(prefix_blocks):
        cache = decode.init_cache(cfg, 3)
        for blk in prefix_blocks:
            _, cache = decode.step(graphdef, params, cache, blk)
        logits, _ = decode.step(graphdef, params, cache, TOKENS[:, 12:16])
        return np.asarray(logits)

    a = run([TOKENS[:, :12]])
    b = run([TOKENS[:, :12]])
    assert a.tobytes() == b.tobytes()  # bit for bit, as the arithmetic coder needs


def test_generate_with_and_without_cache_agree():
    cfg = CONFIGS["gpt2"]
    graphdef, params = models.init(cfg, 3)
    prompt = TOKENS[:, :5]
    for kw in (dict(), dict(temperature=1.0, seed=4), dict(temperature=0.7, top_k=3, seed=5)):
        with_cache = decode.generate(graphdef, params, prompt, 12, **kw)
        without = decode.generate(graphdef, params, prompt, 12, use_cache=False, **kw)
        np.testing.assert_array_equal(with_cache, without)
        np.testing.assert_array_equal(with_cache[:, :5], prompt)


def test_greedy_is_the_argmax_of_the_full_forward():
    cfg = CONFIGS["neox"]
    graphdef, params = models.init(cfg, 4)
    forward = jax.jit(lambda p, s: models.merge(graphdef, p)(s))
    out = decode.generate(graphdef, params, TOKENS[:1, :4], 8)
    seq = np.zeros((1, 12), np.int32)  # causal: the zeros after position t do not change its logits
    seq[:, :4] = TOKENS[:1, :4]
    for t in range(4, 12):
        seq[0, t] = int(jnp.argmax(forward(params, seq)[0, t - 1]))
    np.testing.assert_array_equal(out, seq)
    np.testing.assert_array_equal(decode.generate(graphdef, params, TOKENS[:1, :4], 8, temperature=5.0, top_k=1), seq)


def test_sampling_follows_seed_and_top_k():
    cfg = CONFIGS["gpt2"]
    graphdef, params = models.init(cfg, 5)
    prompt = TOKENS[:2, :3]
    a = decode.generate(graphdef, params, prompt, 20, temperature=1.5, seed=1)
    b = decode.generate(graphdef, params, prompt, 20, temperature=1.5, seed=1)
    c = decode.generate(graphdef, params, prompt, 20, temperature=1.5, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    model = models.merge(graphdef, params)
    out = decode.generate(graphdef, params, prompt, 20, temperature=2.0, top_k=3, seed=0)
    logits = np.asarray(model(jnp.asarray(out[:, :-1])))
    for t in range(2, 22):  # every sampled token is among the 3 most likely at its position
        top3 = np.argsort(logits[:, t], -1)[:, -3:]
        assert all(out[r, t + 1] in top3[r] for r in range(2))


def test_bad_decode_requests():
    cfg = CONFIGS["gpt2"]
    graphdef, params = models.init(cfg)
    with pytest.raises(errors.UserError, match="exceeds the model's context"):
        decode.generate(graphdef, params, TOKENS[:1, :20], 13)
    with pytest.raises(errors.UserError, match="top_k"):
        decode.generate(graphdef, params, TOKENS[:1, :2], 3, temperature=1.0, top_k=65)
    with pytest.raises(errors.UserError, match="prompt"):
        decode.generate(graphdef, params, np.zeros((1, 0), np.int32), 3)
    cache = decode.init_cache(cfg, 1, capacity=8)
    _, cache = decode.step(graphdef, params, cache, TOKENS[:1, :6])
    with pytest.raises(errors.UserError, match="cache capacity 8"):
        decode.step(graphdef, params, cache, TOKENS[:1, :3])
    with pytest.raises(errors.UserError, match="learned positions"):
        decode.init_cache(cfg, 1, capacity=64)


def test_prefill_leaves_the_cache_step_leaves_and_updates_it_in_place():
    cfg = CONFIGS["llama-gqa-window"]
    graphdef, params = models.init(cfg, 6)
    _, by_step = decode.step(graphdef, params, decode.init_cache(cfg, 3, 20), TOKENS[:, :12])
    cache = decode.init_cache(cfg, 3, 20)
    pointers = [x.unsafe_buffer_pointer() for x in (*cache.k, *cache.v)]
    cache = decode.prefill(graphdef, params, cache, TOKENS[:, :12])
    assert int(cache.length) == 12
    for a, b in zip((*cache.k, *cache.v), (*by_step.k, *by_step.v)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    logits, cache = decode.step(graphdef, params, cache, TOKENS[:, 12:16])
    logits_b, _ = decode.step(graphdef, params, by_step, TOKENS[:, 12:16])
    assert np.asarray(logits).tobytes() == np.asarray(logits_b).tobytes()
    cache = decode.reset(cache)  # the same buffers, empty: refilled, it gives the same logits again
    assert int(cache.length) == 0
    cache = decode.prefill(graphdef, params, cache, TOKENS[:, :12])
    again, cache = decode.step(graphdef, params, cache, TOKENS[:, 12:16])
    assert np.asarray(again).tobytes() == np.asarray(logits).tobytes()
    assert [x.unsafe_buffer_pointer() for x in (*cache.k, *cache.v)] == pointers  # donated: never copied
    with pytest.raises(errors.UserError, match="cache capacity 20"):
        decode.prefill(graphdef, params, cache, TOKENS[:, :5])
