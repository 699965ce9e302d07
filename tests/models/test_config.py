import jax
import pytest

from research import errors, models
from research.models import config as mc

CONFIGS = {
    "gpt2": mc.gpt2_style(vocab_size=97, n_layer=3, n_head=4, d_model=32, max_seq_len=24),
    "gpt2_nobias": mc.gpt2_style(vocab_size=97, n_layer=2, n_head=2, d_model=16, bias=False),
    "llama_gqa": mc.llama_style(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32),
    "llama_tied_headdim": mc.llama_style(
        vocab_size=50, n_layer=1, n_head=2, head_dim=24, d_model=32, tie_embeddings=True, bias=True
    ),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_count_params_matches_built_model(name):
    cfg = CONFIGS[name]
    _, params = models.init(cfg)
    assert mc.count_params(cfg) == sum(x.size for x in jax.tree.leaves(params))


def test_count_params_without_embeddings():
    cfg = CONFIGS["gpt2"]
    assert mc.count_params(cfg) - mc.count_params(cfg, embeddings=False) == 97 * 32 + 24 * 32


def test_flops_per_token_by_hand():
    # 1 layer, d=4, 1 head, ff=16, V=10, T=8, no gating: matmul weights = 4*(4*4) + 2*4*16 + 10*4 = 232.
    cfg = mc.gpt2_style(vocab_size=10, n_layer=1, n_head=1, d_model=4, d_ff=16, max_seq_len=8)
    forward = 2 * 232 + 4 * 1 * 8 * 1 * 4
    assert mc.flops_per_token(cfg, training=False) == forward
    assert mc.flops_per_token(cfg) == 3 * forward
    assert mc.flops_per_token(cfg, seq_len=16, training=False) == 2 * 232 + 4 * 16 * 4


def test_llama_swiglu_width_is_rounded_two_thirds_of_4d():
    assert mc.llama_style(d_model=96).ff_dim == 256  # int(8 * 96 / 3) = 256


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(n_head=3, d_model=32), "divisible"),
        (dict(n_head=4, n_kv_head=3), "multiple of n_kv_head"),
        (dict(norm="batchnorm"), "norm must be one of"),
        (dict(vocab_size=0), "vocab_size must be a positive integer"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_bad_model_config_is_a_user_error(kw, match):
    with pytest.raises(errors.UserError, match=match):
        mc.ModelConfig(**kw)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(errors.UserError, match="unknown key"):
        mc.ModelConfig.from_dict({"n_layers": 3})
